"""Exact DP Pareto front against brute force; Pareto utilities."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from placement_search.exact_front import evaluate, exact_front
from placement_search.pareto import hypervolume, pareto_mask
from placement_search.placement import SearchSpace


def brute_front(space: SearchSpace, unary, cost, pair, intercept=0.0):
    n = space.num_layers
    choices = [[space.index(x) for x in space.allowed_at(i)] for i in range(n)]
    idx = np.array(list(itertools.product(*choices)))
    q, c = evaluate(idx, unary, pair, intercept, cost)
    mask = pareto_mask(np.stack([q, -c], axis=1))
    return sorted(zip(np.round(c[mask], 9), np.round(q[mask], 9), strict=True))


def random_problem(n: int, m: int, depth: int, seed: int, integer_cost: bool):
    rng = np.random.default_rng(seed)
    unary = rng.normal(size=(n, m))
    pair = {d: rng.normal(scale=0.5, size=(n - d, m, m)) for d in range(1, depth + 1)}
    cost = rng.integers(1, 9, size=(n, m)).astype(float) if integer_cost else rng.uniform(1, 5, size=(n, m))
    return unary, cost, pair


@pytest.mark.parametrize(("n", "m", "depth", "seed"), [(6, 3, 0, 0), (7, 3, 1, 1), (7, 3, 2, 2), (7, 3, 3, 3),
                                                       (6, 4, 3, 4), (4, 4, 3, 5), (2, 3, 1, 6), (1, 4, 0, 7)])
def test_matches_brute_force_with_integer_costs(n, m, depth, seed) -> None:
    space = SearchSpace.uniform(n, [f"m{j}" for j in range(m)])
    unary, cost, pair = random_problem(n, m, depth, seed, integer_cost=True)
    # integer costs: with bins spanning the range in unit steps the DP is exact
    span = int((cost.max(axis=1) - cost.min(axis=1)).sum())
    front = exact_front(space, unary, cost, pair, intercept=0.3, bins=span + 1)
    got = sorted(zip(np.round(front.cost, 9), np.round(front.quality, 9), strict=True))
    assert got == brute_front(space, unary, cost, pair, intercept=0.3)
    # returned figures are the placements' own
    q, c = evaluate(np.array([p.indices() for p in front.placements]), unary, pair, 0.3, cost)
    np.testing.assert_allclose(q, front.quality)
    np.testing.assert_allclose(c, front.cost)


def test_float_costs_within_resolution() -> None:
    space = SearchSpace.uniform(7, ["a", "b", "c"])
    unary, cost, pair = random_problem(7, 3, 3, 11, integer_cost=False)
    front = exact_front(space, unary, cost, pair, bins=20000)
    ref = np.array(brute_front(space, unary, cost, pair))
    # every exact front point is matched by a DP point no worse in quality at cost within N*delta/2
    tol = 7 * front.delta / 2 + 1e-12
    for c, q in ref:
        ok = (front.cost <= c + tol) & (front.quality >= q - 1e-9)
        assert ok.any(), (c, q)


def test_restricted_space() -> None:
    allowed = (frozenset({"a", "b"}), frozenset({"a", "b", "c"}), frozenset({"c"}), frozenset({"a", "c"}),
               frozenset({"a", "b", "c"}))
    space = SearchSpace(5, ("a", "b", "c"), allowed)
    unary, cost, pair = random_problem(5, 3, 2, 12, integer_cost=True)
    span = int((cost.max(axis=1) - cost.min(axis=1)).sum())
    front = exact_front(space, unary, cost, pair, bins=span + 1)
    for p in front.placements:
        assert all(p[i] in allowed[i] for i in range(5))
    got = sorted(zip(np.round(front.cost, 9), np.round(front.quality, 9), strict=True))
    assert got == brute_front(space, unary, cost, pair)


def test_full_size_runs_fast() -> None:
    space = SearchSpace.uniform(48, ["attention", "sliding_window", "gdn", "kda"])
    unary, cost, pair = random_problem(48, 4, 3, 13, integer_cost=False)
    t0 = time.perf_counter()
    front = exact_front(space, unary, cost, pair, bins=5000)
    assert time.perf_counter() - t0 < 30
    assert len(front) > 10
    assert (np.diff(front.cost) > 0).all() and (np.diff(front.quality) > 0).all()


def test_pareto_mask_and_hypervolume() -> None:
    pts = np.array([[1, 5], [2, 4], [3, 1], [2, 2], [1, 5], [0, 6], [np.nan, 9]])
    mask = pareto_mask(pts)
    assert mask.tolist() == [True, True, True, False, False, True, False]
    # staircase area above reference (0, 0): [3,1] -> 3*1, [2,4] -> 2*3, [1,5] -> 1*1 ; [0,6] adds nothing (x=0)
    assert hypervolume(pts[:6], (0.0, 0.0)) == pytest.approx(3 + 6 + 1)
    assert hypervolume(np.array([[1.0, 1.0]]), (2.0, 0.0)) == 0.0


def _count_speed(counts: dict) -> float:
    # nonlinear in the counts, like throughput under max_fit; nan = "does not fit"
    a = counts.get("m0", 0)
    if a >= 5:
        return float("nan")
    return 100.0 / (1.0 + a * a) + 3.0 * counts.get("m2", 0) - 0.5 * counts.get("m1", 0)


@pytest.mark.parametrize(("n", "m", "depth", "seed"), [(6, 3, 0, 0), (6, 3, 2, 1), (6, 4, 3, 2), (7, 3, 3, 3),
                                                       (3, 4, 3, 4), (1, 3, 0, 5)])
def test_counts_front_matches_brute_force(n, m, depth, seed) -> None:
    from placement_search.exact_front import exact_front_by_counts

    space = SearchSpace.uniform(n, [f"m{j}" for j in range(m)])
    unary, _, pair = random_problem(n, m, depth, seed, integer_cost=True)
    front = exact_front_by_counts(space, unary, _count_speed, pair, intercept=0.2)
    idx = np.array(list(itertools.product(range(m), repeat=n)))
    q, _ = evaluate(idx, unary, pair, 0.2, np.zeros((n, m)))
    sp = np.array([_count_speed({f"m{j}": int((row == j).sum()) for j in range(m)}) for row in idx])
    ok = ~np.isnan(sp)
    mask = pareto_mask(np.stack([q[ok], sp[ok]], axis=1))
    ref = sorted(zip(np.round(sp[ok][mask], 9), np.round(q[ok][mask], 9), strict=True))
    got = sorted(zip(np.round(front.speed, 9), np.round(front.quality, 9), strict=True))
    assert got == ref
    for p, s in zip(front.placements, front.speed, strict=True):
        assert _count_speed(p.counts()) == pytest.approx(s)


def test_counts_front_full_size() -> None:
    from placement_search.exact_front import exact_front_by_counts

    space = SearchSpace.uniform(48, ["attention", "sliding_window", "gdn", "kda"])
    unary, _, pair = random_problem(48, 4, 2, 14, integer_cost=False)  # D=2: 1.9M cells (D=3: 7.5M, ~4x longer)
    t0 = time.perf_counter()
    front = exact_front_by_counts(space, unary, lambda c: 1.0 / (1 + c["attention"]) + 0.01 * c["gdn"], pair)
    assert time.perf_counter() - t0 < 60
    assert len(front) > 5 and (np.diff(front.speed) > 0).all() and (np.diff(front.quality) < 0).all()
