"""Placement samplers: reproducible, distinct, covering extreme mixes."""

from __future__ import annotations

import numpy as np
import pytest

from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement, SearchSpace
from placement_search.sampling import random_composition, sample, structured_family

MIXERS = ("attention", "sliding_window", "gdn", "kda")
SPACE = SearchSpace.uniform(48, MIXERS)


@pytest.mark.parametrize("sampler", ["uniform", "stratified", "structured"])
def test_reproducible_and_distinct(sampler: str) -> None:
    a = sample(SPACE, 200, sampler, seed=3)
    b = sample(SPACE, 200, sampler, seed=3)
    assert a == b and len(set(a)) == len(a) > 0
    assert sample(SPACE, 50, sampler, seed=4) != a[:50] or (sampler == "structured" and len(a) < 50)


def test_exclude() -> None:
    first = sample(SPACE, 100, "uniform", seed=1)
    more = sample(SPACE, 100, "uniform", seed=1, exclude=first)
    assert not set(first) & set(more)


def test_stratified_covers_extremes_uniform_does_not() -> None:
    def attention_counts(ps: list[Placement]) -> np.ndarray:
        return np.array([p.counts()["attention"] for p in ps])

    strat = attention_counts(sample(SPACE, 2000, "stratified", seed=0))
    unif = attention_counts(sample(SPACE, 2000, "uniform", seed=0))
    # uniform: Binomial(48, 1/4), mean 12, std 3: counts beyond 24 are rare (seed 0: 2 of 2000)
    assert (unif > 24).mean() < 0.01
    # stratified: P(count > 24) over compositions of 48 into 4 parts is about 1/8
    assert 0.08 < (strat > 24).mean() < 0.18
    assert strat.min() == 0 and strat.max() >= 40


def test_composition_is_uniform_over_simplex() -> None:
    rng = np.random.default_rng(0)
    draws = [tuple(random_composition(3, 3, rng)) for _ in range(10000)]
    assert all(sum(d) == 3 and min(d) >= 0 for d in draws)
    # 10 compositions of 3 into 3 parts, each ~1000 times
    values, counts = np.unique(np.array(draws), axis=0, return_counts=True)
    assert len(values) == 10 and counts.min() > 850 and counts.max() < 1150


def test_structured_family() -> None:
    fam = structured_family(SPACE)
    codes = {p.code() for p in fam}
    assert {"A" * 48, "S" * 48, "G" * 48, "K" * 48} <= codes
    assert ("AG" * 24) in codes and ("A" * 24 + "G" * 24) in codes and ("G" * 47 + "A") in codes
    assert len(codes) == len(fam)


def test_restricted_space_respected() -> None:
    allowed = tuple(frozenset(MIXERS) if i % 2 else frozenset({"attention", "gdn"}) for i in range(8))
    space = SearchSpace(8, MIXERS, allowed)
    for sampler in ("uniform", "stratified", "structured"):
        for p in sample(space, 100, sampler, seed=0):
            assert all(p[i] in {"attention", "gdn"} for i in range(0, 8, 2))


def test_bad_sampler() -> None:
    with pytest.raises(PlacementSearchError, match="unknown sampler 'sobol'"):
        sample(SPACE, 3, "sobol")
