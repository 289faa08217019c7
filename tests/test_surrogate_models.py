"""The surrogates on known-answer functions, and their scikit-learn behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.base import clone
from sklearn.model_selection import cross_val_score

from placement_search.placement import one_hot_matrix
from placement_search.surrogate import ClusterExpansion, EnsembleSurrogate, LinearSurrogate, XGBSurrogate
from placement_search.surrogate.cluster import canonicalize, evaluate_expansion
from placement_search.surrogate.datasets import (
    additive_quality,
    default_space,
    pairwise_quality,
    sample_uniform,
)
from placement_search.surrogate.registry import SURROGATE_NAMES, make_surrogate
from placement_search.surrogate.validation import interval_coverage


def _data(quality, n_train, n_test, seed):
    rng = np.random.default_rng(seed)
    space = quality.space
    X_train = sample_uniform(space, n_train, rng)
    X_test = sample_uniform(space, n_test, rng)
    return X_train, quality.sample(X_train, rng), X_test, quality.sample(X_test, rng), quality(X_test)


def _r2(y, p):
    return 1.0 - np.mean((y - p) ** 2) / np.var(y)


@pytest.fixture(scope="module")
def additive48():
    return _data(additive_quality(default_space(48), seed=1, noise_std=0.1), 800, 400, seed=0)


@pytest.fixture(scope="module")
def pairwise16():
    quality = pairwise_quality(default_space(16), seed=2, noise_std=0.05)
    return quality, _data(quality, 1200, 400, seed=1)


def test_ridge_recovers_additive_function(additive48):
    X, y, X_test, _, truth = additive48
    model = LinearSurrogate(alpha=0.1).fit(X, y)
    assert stats.spearmanr(model.predict(X_test), truth).statistic > 0.99
    quality = additive_quality(default_space(48), seed=1)
    np.testing.assert_allclose(model.unary_, quality.unary, atol=0.05)


def test_xgboost_ranks_additive_function_from_800_samples(additive48):
    X, y, X_test, _, truth = additive48
    model = XGBSurrogate(n_estimators=300, learning_rate=0.15).fit(X, y)
    assert stats.spearmanr(model.predict(X_test), truth).statistic > 0.9


def test_cluster_expansion_recovers_pairs_where_ridge_cannot(pairwise16):
    quality, (X, y, X_test, _, truth) = pairwise16
    cluster = ClusterExpansion(max_distance=3).fit(X, y)
    ridge = LinearSurrogate().fit(X, y)
    assert _r2(truth, cluster.predict(X_test)) > 0.98
    assert _r2(truth, ridge.predict(X_test)) < 0.9
    for d in (1, 2, 3):
        assert cluster.pair_[d].shape == (16 - d, 4, 4)
        np.testing.assert_allclose(cluster.pair_[d], quality.pair[d], atol=0.1)
    np.testing.assert_allclose(cluster.unary_, quality.unary, atol=0.1)
    assert cluster.intercept_ == pytest.approx(quality.intercept, abs=0.05)


def test_cluster_arrays_reproduce_predict_exactly(pairwise16):
    _, (X, y, X_test, _, _) = pairwise16
    for model in (ClusterExpansion(prior="ridge", pair_alpha=3.0, include_counts=True), ClusterExpansion()):
        model.fit(X[:300], y[:300])
        idx = np.stack([p.indices() for p in X_test])
        unary, pair, intercept = model.expansion()
        np.testing.assert_allclose(evaluate_expansion(idx, unary, pair, intercept), model.predict(X_test), atol=1e-8)
        np.testing.assert_allclose(unary.mean(axis=1), 0, atol=1e-10)
        for mats in pair.values():
            np.testing.assert_allclose(mats.mean(axis=1), 0, atol=1e-10)
            np.testing.assert_allclose(mats.mean(axis=2), 0, atol=1e-10)


@pytest.mark.parametrize("prior", ["ridge", "bayesian"])
def test_linear_uncertainty_is_calibrated(additive48, prior):
    X, y, X_test, y_test, _ = additive48
    model = LinearSurrogate(prior=prior, alpha=0.1).fit(X, y)
    mean, std = model.predict(X_test, return_std=True)
    assert std.shape == mean.shape and np.all(std > 0)
    coverage = interval_coverage(y_test, mean - 1.2816 * std, mean + 1.2816 * std)
    assert 0.7 <= coverage <= 0.9


def test_ensemble_interval_coverage_near_nominal(additive48):
    X, y, X_test, y_test, _ = additive48
    base = XGBSurrogate(n_estimators=150, learning_rate=0.2)
    model = EnsembleSurrogate(base, n_members=6, random_state=3).fit(X[:500], y[:500])
    mean, std = model.predict(X_test, return_std=True)
    assert np.all(std > 0)
    for alpha, (low, high) in ((0.2, (0.65, 0.95)), (0.5, (0.35, 0.65))):
        lo, hi = model.predict_interval(X_test, alpha=alpha)
        assert low <= interval_coverage(y_test, lo, hi) <= high
        assert np.all(lo <= mean) and np.all(hi >= mean)


def test_ensemble_over_linear_uses_member_std(additive48):
    X, y, X_test, y_test, _ = additive48
    model = EnsembleSurrogate(LinearSurrogate(alpha=0.1), n_members=4, resample="subsample").fit(X, y)
    assert model.noise_var_ == 0.0
    lo, hi = model.predict_interval(X_test, alpha=0.2)
    assert 0.65 <= interval_coverage(y_test, lo, hi) <= 0.95


def test_arrays_and_placements_are_interchangeable(additive48):
    X, y, X_test, _, _ = additive48
    a = LinearSurrogate().fit(one_hot_matrix(X[:200]), y[:200])
    b = LinearSurrogate().fit(X[:200], y[:200])
    np.testing.assert_allclose(a.predict(X_test), b.predict(one_hot_matrix(X_test)))
    assert a.space_ is None and b.space_ == X[0].space


def test_sklearn_clone_params_and_cross_val_score(additive48):
    X, y, _, _, _ = additive48
    ensemble = EnsembleSurrogate(XGBSurrogate(n_estimators=20), n_members=2)
    params = ensemble.get_params(deep=True)
    assert params["estimator__n_estimators"] == 20
    copy = clone(ensemble).set_params(estimator__max_depth=4, n_members=3)
    assert copy.estimator.max_depth == 4 and ensemble.estimator.max_depth == 2
    assert not hasattr(copy, "members_")
    for model in (LinearSurrogate(), XGBSurrogate(n_estimators=30), ClusterExpansion(max_distance=1, prior="ridge")):
        scores = cross_val_score(model, X[:300], y[:300], cv=3)
        assert scores.shape == (3,) and np.all(np.isfinite(scores))
    scores = cross_val_score(ensemble, one_hot_matrix(X[:200]), y[:200], cv=2, scoring="neg_mean_squared_error")
    assert np.all(scores < 0)


def test_predict_rejects_other_search_space(additive48):
    X, y, _, _, _ = additive48
    model = LinearSurrogate().fit(X[:50], y[:50])
    other = sample_uniform(default_space(8), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="48"):
        model.predict(other)


@pytest.mark.parametrize("name", SURROGATE_NAMES)
def test_every_named_surrogate_fits(name):
    quality = additive_quality(default_space(6), seed=0)
    X, y, X_test, _, truth = _data(quality, 60, 20, seed=4)
    model = make_surrogate(name, seed=1)
    if isinstance(model, EnsembleSurrogate):
        model.set_params(n_members=2)
    if "xgb" in name:
        model.set_params(**{("estimator__" if isinstance(model, EnsembleSurrogate) else "") + "n_estimators": 50})
    pred = model.fit(X, y).predict(X_test)
    assert pred.shape == (20,) and stats.spearmanr(pred, truth).statistic > 0.5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 9), m=st.integers(1, 5))
def test_canonicalize_keeps_every_prediction(seed, n, m):
    rng = np.random.default_rng(seed)
    unary = rng.standard_normal((n, m))
    pair = {d: rng.standard_normal((n - d, m, m)) for d in range(1, min(3, n - 1) + 1)}
    idx = rng.integers(0, m, size=(20, n))
    before = evaluate_expansion(idx, unary, pair, 1.5)
    cu, cp, ci = canonicalize(unary, pair, 1.5)
    np.testing.assert_allclose(evaluate_expansion(idx, cu, cp, ci), before, atol=1e-9)
    again = canonicalize(cu, cp, ci)
    np.testing.assert_allclose(again[0], cu, atol=1e-12)


def test_tuning_an_ensemble_with_the_default_base():
    from placement_search.surrogate.tuning import tune_hyperparameters

    quality = additive_quality(default_space(6), seed=0)
    X, y, _, _, _ = _data(quality, 40, 1, seed=0)
    result = tune_hyperparameters(EnsembleSurrogate(n_members=2), X, y, n_trials=1, cv=2)
    assert isinstance(result.estimator.estimator, XGBSurrogate)
