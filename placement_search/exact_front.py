"""Exact Pareto front of a cluster-expansion quality model under an additive cost.

Quality (a cluster expansion with pair terms up to distance ``D``; ``D = 0`` is the linear
per-layer model)::

    Q(x) = intercept + sum_l unary[l, x_l] + sum_{d=1..D} sum_l pair[d][l, x_l, x_{l+d}]

Cost (additive, e.g. decode step time at a fixed batch)::

    C(x) = sum_l cost[l, x_l]

Dynamic programming over layers: the state after layer ``l`` is the last ``D`` mixers
(``M**D`` states) and the accumulated cost, discretised into ``bins`` steps of width ``delta``;
each (state, cost bin) keeps the best quality reaching it, with its exact (undiscretised) cost
and a back-pointer. The front is the non-dominated set of the final (exact cost, quality) pairs.

Exactness: when every per-layer cost is a multiple of ``delta`` (integer costs, say), the front is
exact. Otherwise a placement can be lost to another in the same cost bin whose exact cost is at
most ``N * delta / 2`` larger; with the default ``bins=20000`` that is < 0.15% of the cost range
for N=48. The returned costs and qualities are always the exact values of the returned placements.

Time ``O(N * M**(D+1) * bins)``; memory ``O(N * M**D * bins)`` bytes of back-pointers
(48 layers, 4 mixers, D=3, 20000 bins: ~61 MB, ~2 s on one core).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from placement_search.errors import PlacementSearchError
from placement_search.pareto import pareto_mask
from placement_search.placement import Placement, SearchSpace


@dataclass(frozen=True)
class ExactFront:
    """The Pareto-optimal placements, ordered by increasing cost (and quality)."""

    placements: list[Placement]
    quality: np.ndarray
    cost: np.ndarray
    delta: float

    def __len__(self) -> int:
        return len(self.placements)


def evaluate(
    indices: np.ndarray, unary: np.ndarray, pair: Mapping[int, np.ndarray], intercept: float, cost: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Quality and cost of placements given as mixer indices ``[P, N]``."""
    idx = np.atleast_2d(indices)
    n = unary.shape[0]
    layers = np.arange(n)
    q = np.full(idx.shape[0], float(intercept)) + unary[layers, idx].sum(axis=1)
    for d, mats in pair.items():
        if d < n:
            q += mats[layers[: n - d], idx[:, : n - d], idx[:, d:]].sum(axis=1)
    c = cost[layers, idx].sum(axis=1)
    return q, c


def exact_front(
    space: SearchSpace,
    unary: np.ndarray,
    cost: np.ndarray,
    pair: Mapping[int, np.ndarray] | None = None,
    intercept: float = 0.0,
    *,
    bins: int = 20000,
) -> ExactFront:
    """The (quality max, cost min) Pareto front over every placement of ``space``.

    Parameters
    ----------
    unary: ``[N, M]`` per-layer quality terms (columns in ``space.mixers`` order).
    cost: ``[N, M]`` per-layer additive cost (>= 0 not required).
    pair: ``{d: [N-d, M, M]}`` pair terms for layers ``l`` and ``l+d``.
    bins: cost resolution (see the module docstring on exactness).
    """
    n, m = space.num_layers, space.num_mixers
    pair = {int(d): np.asarray(v, dtype=np.float64) for d, v in (pair or {}).items() if np.any(v)}
    unary = np.asarray(unary, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if unary.shape != (n, m) or cost.shape != (n, m):
        raise PlacementSearchError(f"unary and cost must be [{n}, {m}], got {unary.shape} and {cost.shape}")
    for d, mats in pair.items():
        if d < 1 or mats.shape != (n - d, m, m):
            raise PlacementSearchError(f"pair[{d}] must be [{n - d}, {m}, {m}], got {mats.shape}")
    if not (np.isfinite(unary).all() and np.isfinite(cost).all()):
        raise PlacementSearchError("unary and cost must be finite")
    if bins < 2:
        raise PlacementSearchError(f"bins must be >= 2, got {bins}")

    allowed = np.zeros((n, m), dtype=bool)
    for i in range(n):
        allowed[i, [space.index(x) for x in space.allowed_at(i)]] = True
    depth = max(pair, default=0)
    depth = min(depth, n - 1)
    # Cost discretisation relative to each layer's cheapest allowed mixer.
    low = np.where(allowed, cost, np.inf).min(axis=1)
    high = np.where(allowed, cost, -np.inf).max(axis=1)
    span = float((high - low).sum())
    delta = span / (bins - 1) if span > 0 else 1.0
    cbin = np.where(allowed, np.rint((cost - low[:, None]) / delta), 0).astype(np.int64)
    nbins = int(cbin.max(axis=1).sum()) + 1

    d_states = m**depth if depth > 0 else 1
    neg = -np.inf
    # best[s, k]: best quality with state s (last `depth` mixers, base-m digits, oldest first) at cost bin k
    best = np.full((d_states, nbins), neg)
    exact = np.zeros((d_states, nbins))
    back: list[np.ndarray] = []  # per layer >= depth: the dropped (oldest) mixer of the best predecessor

    # Layers 0 .. depth-1: enumerate their M**depth prefixes directly.
    if depth > 0:
        prefixes = np.array(np.unravel_index(np.arange(d_states), (m,) * depth)).T  # [S, depth]
        ok = allowed[np.arange(depth), prefixes].all(axis=1)
        sub_pair = {d: mats[: depth - d] for d, mats in pair.items() if d < depth}
        q0, _ = evaluate(prefixes, unary[:depth], sub_pair, intercept, cost[:depth])
        c0 = cost[np.arange(depth), prefixes].sum(axis=1)
        k0 = cbin[np.arange(depth), prefixes].sum(axis=1)
        for s in np.flatnonzero(ok):
            best[s, k0[s]] = q0[s]
            exact[s, k0[s]] = c0[s]
        start = depth
    else:
        best[0, 0] = intercept
        start = 0

    for layer in range(start, n):
        new_best = np.full_like(best, neg)
        new_exact = np.zeros_like(exact)
        dropped = np.zeros((d_states, nbins), dtype=np.int8)
        if depth > 0:
            # old state s = (a_{l-depth}, ..., a_{l-1}); digits oldest first
            digits = np.array(np.unravel_index(np.arange(d_states), (m,) * depth)).T  # [S, depth]
        for b in range(m):
            if not allowed[layer, b]:
                continue
            gain = np.full(d_states, unary[layer, b])
            for d, mats in pair.items():
                if d <= layer:
                    gain += mats[layer - d, digits[:, depth - d], b]
            shift = cbin[layer, b]
            cand = best + gain[:, None]  # [S, K]
            cand_exact = exact + cost[layer, b]
            if depth > 0:
                cand = cand.reshape(m, d_states // m, nbins)  # [dropped, mid, K]
                cand_exact = cand_exact.reshape(m, d_states // m, nbins)
                arg = cand.argmax(axis=0)  # [mid, K]
                top = np.take_along_axis(cand, arg[None], axis=0)[0]
                top_exact = np.take_along_axis(cand_exact, arg[None], axis=0)[0]
                targets = np.arange(d_states // m) * m + b  # new state = (mid..., b)
            else:
                arg = np.zeros((1, nbins), dtype=np.int64)
                top, top_exact, targets = cand, cand_exact, np.array([0])
            if shift:
                top = np.concatenate([np.full((top.shape[0], shift), neg), top[:, :-shift]], axis=1)
                top_exact = np.concatenate([np.zeros((top.shape[0], shift)), top_exact[:, :-shift]], axis=1)
                arg = np.concatenate([np.zeros((arg.shape[0], shift), dtype=arg.dtype), arg[:, :-shift]], axis=1)
            if depth > 0:
                new_best[targets] = top
                new_exact[targets] = top_exact
                dropped[targets] = arg
            else:
                better = top[0] > new_best[0]
                new_best[0] = np.where(better, top[0], new_best[0])
                new_exact[0] = np.where(better, top_exact[0], new_exact[0])
                dropped[0] = np.where(better, b, dropped[0])
        best, exact = new_best, new_exact
        back.append(dropped)

    states, kbins = np.nonzero(np.isfinite(best))
    if states.size == 0:
        raise PlacementSearchError("no placement fits the search space")
    obj = np.stack([best[states, kbins], -exact[states, kbins]], axis=1)
    front = np.flatnonzero(pareto_mask(obj))
    placements = [_backtrack(int(states[i]), int(kbins[i]), back, cbin, depth, m, n, start) for i in front]
    idx = np.array(placements)
    q, c = evaluate(idx, unary, pair, intercept, cost)
    order = np.argsort(c, kind="stable")
    return ExactFront(
        placements=[Placement([space.mixers[j] for j in idx[i]], space) for i in order],
        quality=q[order],
        cost=c[order],
        delta=delta,
    )


def _backtrack(state: int, k: int, back: list[np.ndarray], cbin: np.ndarray, depth: int, m: int, n: int,
               start: int) -> list[int]:
    """Mixer indices of the path ending in ``state`` at cost bin ``k`` after the last layer."""
    out = [0] * n
    for layer in range(n - 1, start - 1, -1):
        dropped = int(back[layer - start][state, k])
        if depth > 0:
            b = state % m
            state = dropped * m ** (depth - 1) + state // m
        else:
            b = dropped
        out[layer] = b
        k -= int(cbin[layer, b])
    if depth > 0:
        digits = np.unravel_index(state, (m,) * depth)
        for j in range(depth):
            out[j] = int(digits[j])
    return out
