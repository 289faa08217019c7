"""Featurizing placements: one-hot validation, pair and count features, samplers."""

from __future__ import annotations

import numpy as np
import pytest

from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement, one_hot_matrix
from placement_search.surrogate.datasets import (
    SAMPLERS,
    default_space,
    make_synthetic_table,
    pairwise_quality,
    sample_placements,
)
from placement_search.surrogate.features import as_onehot, count_features, pair_features, speed_proxy


@pytest.fixture(scope="module")
def space():
    return default_space(8)


def test_onehot_from_placements_and_arrays_agree(space):
    rng = np.random.default_rng(0)
    placements = sample_placements(space, "uniform", 20, rng)
    flat = one_hot_matrix(placements)
    a = as_onehot(placements)
    b = as_onehot(flat)
    c = as_onehot(flat.reshape(20, 8, 4))
    assert a.space == space and b.space is None
    assert (a.num_layers, a.num_mixers) == (b.num_layers, b.num_mixers) == (c.num_layers, c.num_mixers) == (8, 4)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.matrix, c.matrix)
    np.testing.assert_array_equal(a.indices(), np.stack([p.indices() for p in placements]))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((2, 8), 0.5), "not one-hot"),
        (np.zeros((0, 8)), "no rows"),
        (np.array([[1, 1, 0, 0, 0, 0, 0, 0]]), "exactly one"),
        (np.array([[1, 0, 0, 1, 0, 0, 0, 1]]), "does not divide"),
        (np.zeros((2, 3, 3, 3)), "must be"),
    ],
)
def test_onehot_rejects_bad_arrays(array, message):
    with pytest.raises(PlacementSearchError, match=message):
        as_onehot(array)


def test_onehot_rejects_wrong_shape_for_fitted_model(space):
    placements = sample_placements(space, "uniform", 3, np.random.default_rng(0))
    with pytest.raises(PlacementSearchError, match="fitted on 10"):
        as_onehot(placements, num_layers=10)
    with pytest.raises(PlacementSearchError, match="expected a Placement"):
        as_onehot([placements[0], "AAAA"])


def test_pair_and_count_features_match_brute_force(space):
    placements = sample_placements(space, "uniform", 5, np.random.default_rng(1))
    oh = as_onehot(placements)
    for d in (1, 2, 3):
        feats = pair_features(oh, d).reshape(5, 8 - d, 4, 4)
        for p, pl in enumerate(placements):
            idx = pl.indices()
            expected = np.zeros((8 - d, 4, 4))
            expected[np.arange(8 - d), idx[:-d], idx[d:]] = 1
            np.testing.assert_array_equal(feats[p], expected)
    counts = count_features(oh)
    np.testing.assert_array_equal(counts, [[pl.counts()[m] for m in space.mixers] for pl in placements])
    np.testing.assert_array_equal(speed_proxy(placements), counts[:, 0])
    np.testing.assert_array_equal(speed_proxy(oh.matrix), counts[:, 0])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_give_valid_placements(sampler):
    space = default_space(48)
    placements = sample_placements(space, sampler, 30, np.random.default_rng(2))
    assert len(placements) == 30
    assert all(isinstance(p, Placement) and len(p) == 48 for p in placements)


def test_stratified_covers_attention_counts_uniform_does_not():
    space = default_space(48)
    rng = np.random.default_rng(3)
    uniform = speed_proxy(sample_placements(space, "uniform", 300, rng))
    stratified = speed_proxy(sample_placements(space, "stratified", 300, rng))
    assert stratified.max() - stratified.min() > 2 * (uniform.max() - uniform.min())


def test_synthetic_table_columns_and_known_answer():
    quality = pairwise_quality(default_space(12), seed=0, noise_std=0.0)
    table = make_synthetic_table(quality, {"uniform": 10, "structured": 5}, seed=1)
    assert list(table.columns) == ["placement", "score", "sampler", "speed", "true_score"]
    assert table["sampler"].value_counts().to_dict() == {"uniform": 10, "structured": 5}
    np.testing.assert_allclose(table["score"], table["true_score"])
    placements = [Placement.parse(code, quality.space) for code in table["placement"]]
    np.testing.assert_allclose(quality(placements), table["true_score"])
