"""Ensemble intervals on known-answer functions: nominal coverage on a fresh held-out sample, and the
out-of-distribution inflation option."""

from __future__ import annotations

import numpy as np
import pytest

from placement_search import sampling
from placement_search.surrogate import (
    ClusterExpansion,
    EnsembleSurrogate,
    XGBSurrogate,
    load_surrogate,
    save_surrogate,
)
from placement_search.surrogate.datasets import default_space, pairwise_quality
from placement_search.surrogate.validation import calibration, interval_bounds, interval_coverage, ood_splits

LEVELS = (0.5, 0.8, 0.9, 0.95)


@pytest.fixture(scope="module")
def pairwise16():
    """Pair terms at distances 1-2 over 16 layers: training rows and a *fresh* sample, both uniform."""
    quality = pairwise_quality(default_space(16), seed=2, max_distance=2, pair_scale=0.8, noise_std=0.3)
    X = sampling.sample(quality.space, 1400, "uniform", seed=11)
    y = quality.sample(X, np.random.default_rng(12))
    return quality, X[:600], y[:600], X[600:], y[600:]


MODELS = {
    "ensemble-xgb": lambda: EnsembleSurrogate(XGBSurrogate(n_estimators=300), n_members=8, random_state=1),
    "ensemble-cluster": lambda: EnsembleSurrogate(
        ClusterExpansion(max_distance=2, prior="ridge", pair_alpha=4.0), n_members=5, resample="kfold", random_state=1
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_coverage_on_a_fresh_sample_is_nominal(pairwise16, name):
    _, X, y, X_new, y_new = pairwise16
    model = MODELS[name]().fit(X, y)
    assert model.oob_fraction_ > 0.8 and model.scores_.size > 400
    for level, (lo, hi) in interval_bounds(model, X_new, LEVELS).items():
        # 800 fresh points: the sampling sd of a coverage is <= 0.018, so 0.06 is > 3 sd.
        assert abs(interval_coverage(y_new, lo, hi) - level) <= 0.06, (name, level)


def test_old_mixed_normaliser_is_gone(pairwise16):
    """Bootstrap members of a 500-weight cluster model: out-of-bag scores must use OOB members only,
    so that the 50% and 95% intervals are right at once (they were 0.69 and 0.90)."""
    _, X, y, X_new, y_new = pairwise16
    model = EnsembleSurrogate(ClusterExpansion(max_distance=2, prior="ridge", pair_alpha=4.0), n_members=8).fit(X, y)
    bounds = interval_bounds(model, X_new, (0.5, 0.95))
    low50, high95 = (interval_coverage(y_new, *bounds[lv]) for lv in (0.5, 0.95))
    assert low50 <= 0.62 and high95 >= 0.9


def test_inflation_fitted_on_held_out_ood_rows(pairwise16, tmp_path):
    quality, X, y, _, _ = pairwise16
    structured = sampling.sample(quality.space, 400, "structured", seed=3)
    ys = quality.sample(structured, np.random.default_rng(4))
    model = MODELS["ensemble-xgb"]().fit(X, y)
    before = model.quantile(0.9)
    factor = model.calibrate_inflation(structured[::2], ys[::2])
    assert factor >= 1.0 and model.inflation_ == factor
    assert model.quantile(0.9) == pytest.approx(before * factor)
    lo, hi = model.predict_interval(structured[1::2], alpha=0.1)
    assert interval_coverage(ys[1::2], lo, hi) >= 0.85
    loaded = load_surrogate(save_surrogate(model, tmp_path / "m"))
    assert loaded.inflation_ == factor
    assert model.fit(X, y).inflation_ == 1.0  # refitting resets it


def test_calibration_reports_inflated_ood_rows(pairwise16):
    quality, X, y, _, _ = pairwise16
    extra = sampling.sample(quality.space, 60, "structured", seed=5)
    placements = list(X[:200]) + extra
    target = np.concatenate([y[:200], quality.sample(extra, np.random.default_rng(6))])
    groups = np.array(["uniform"] * 200 + ["structured"] * len(extra), dtype=object)
    model = EnsembleSurrogate(XGBSurrogate(n_estimators=50), n_members=4)
    cal = calibration(model, placements, target, list(ood_splits(groups)), levels=(0.8,), inflate_ood=True)
    assert set(cal["split"]) == {"ood:structured", "ood:structured+inflated"}
    inflated = cal[cal["split"] == "ood:structured+inflated"]
    assert len(inflated) == 2 and (inflated["inflation"] >= 1.0).all()
    assert (cal.loc[cal["split"] == "ood:structured", "inflation"] == 1.0).all()
