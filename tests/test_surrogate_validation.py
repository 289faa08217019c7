"""Validation splits, metrics, learning curves, calibration and Optuna tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement
from placement_search.surrogate import EnsembleSurrogate, LinearSurrogate, XGBSurrogate
from placement_search.surrogate.datasets import additive_quality, default_space, make_synthetic_table
from placement_search.surrogate.tuning import nested_cross_validation, tune_hyperparameters
from placement_search.surrogate.validation import (
    calibration,
    kfold_splits,
    learning_curve,
    ood_splits,
    ood_validation,
    precision_at_top_k,
    regression_metrics,
    resolve_speed,
    score_predictions,
    speed_buckets,
    summary_table,
    validate_surrogate,
)


@pytest.fixture(scope="module")
def table():
    quality = additive_quality(default_space(12), seed=0, noise_std=0.1)
    frame = make_synthetic_table(quality, {"uniform": 240, "stratified": 60, "structured": 60}, seed=0)
    placements = [Placement.parse(c, quality.space) for c in frame["placement"]]
    return placements, frame


def test_regression_metrics_known_values():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    m = regression_metrics(y, y)
    assert m["r2"] == 1.0 and m["spearman"] == pytest.approx(1.0) and m["kendall"] == pytest.approx(1.0)
    m = regression_metrics(y, -y)
    assert m["spearman"] == pytest.approx(-1.0) and m["kendall"] == pytest.approx(-1.0)
    assert np.isnan(regression_metrics(y, np.ones(4))["spearman"])


def test_precision_at_top_k_and_buckets():
    y = np.arange(20.0)
    assert precision_at_top_k(y, y, 0.1) == 1.0
    assert precision_at_top_k(y, -y, 0.1) == 0.0
    pred = y.copy()
    pred[19] = -1  # the best one is missed
    assert precision_at_top_k(y, pred, 0.1) == 0.5
    buckets = speed_buckets(np.repeat([1.0, 2.0, 3.0, 4.0], 5), 4)
    np.testing.assert_array_equal(buckets, np.repeat([0, 1, 2, 3], 5))
    assert set(speed_buckets(np.ones(7), 4)) == {0}
    rows = score_predictions(y, y, speed=np.repeat([1.0, 2.0], 10), n_buckets=2)
    buckets_seen = {b for m, b, _ in rows if m.startswith("precision")}
    assert buckets_seen == {"0", "1", "mean"}


def test_speed_proxy_counts_attention(table):
    placements, _ = table
    speed = resolve_speed(placements, None)
    np.testing.assert_array_equal(speed, [-p.counts()["attention"] for p in placements])
    with pytest.raises(PlacementSearchError, match="speed"):
        resolve_speed(placements, np.ones(3))


def test_splits():
    folds = list(kfold_splits(10, 5, seed=0))
    assert len(folds) == 5
    assert sorted(np.concatenate([te for *_, te in folds]).tolist()) == list(range(10))
    groups = np.array(["uniform"] * 4 + ["stratified"] * 3 + ["structured"] * 2)
    ood = list(ood_splits(groups))
    assert [s for s, *_ in ood] == ["ood:stratified", "ood:structured"]
    assert all(set(tr) == {0, 1, 2, 3} for _, _, tr, _ in ood)
    with pytest.raises(PlacementSearchError, match="uniform"):
        list(ood_splits(np.array(["a", "b"])))


def test_validate_surrogate_tidy_table(table):
    placements, frame = table
    metrics = validate_surrogate(
        LinearSurrogate(), placements, frame["score"], cv=3, groups=frame["sampler"], speed=frame["speed"]
    )
    assert list(metrics.columns) == ["model", "split", "fold", "n_train", "n_test", "metric", "bucket", "value"]
    assert set(metrics["split"]) == {"kfold", "ood:stratified", "ood:structured"}
    kfold = metrics[(metrics.split == "kfold") & (metrics.metric == "spearman")]
    assert len(kfold) == 3 and (kfold["value"] > 0.99).all()
    summary = summary_table(metrics)
    assert list(summary["split"]) == ["kfold", "ood:stratified", "ood:structured"]
    assert {"r2", "spearman", "kendall", "precision@top10%[mean]", "precision@top10%[0]"} <= set(summary.columns)
    assert summary.loc[0, "folds"] == 3 and summary.loc[0, "n_test"] == 360


def test_ood_validation_only_trains_on_uniform(table):
    placements, frame = table
    metrics = ood_validation(LinearSurrogate(), placements, frame["score"].to_numpy(), frame["sampler"])
    assert set(metrics["n_train"]) == {240}


def test_learning_curve_improves_with_size(table):
    placements, frame = table
    curve = learning_curve(
        LinearSurrogate(alpha=0.1), placements, frame["score"], sizes=(15, 40, 200, 10_000), repeats=2, seed=0
    )
    assert sorted(curve["size"].unique()) == [15, 40, 200]
    r2 = curve[curve.metric == "r2"].groupby("size")["value"].mean()
    assert r2[200] > r2[15] and r2[200] > 0.99


def test_calibration_table(table):
    placements, frame = table
    splits = list(kfold_splits(len(placements), 3, seed=0))
    cal = calibration(LinearSurrogate(alpha=0.1), placements, frame["score"], splits, levels=(0.5, 0.9))
    assert list(cal.columns) == ["model", "split", "fold", "level", "coverage", "width", "n_test", "inflation"]
    mean = cal.groupby("level")["coverage"].mean()
    assert abs(mean[0.5] - 0.5) < 0.12 and abs(mean[0.9] - 0.9) < 0.08
    ens = calibration(
        EnsembleSurrogate(XGBSurrogate(n_estimators=40), n_members=3), placements, frame["score"], splits[:1],
        levels=(0.8,),
    )
    assert len(ens) == 1
    with pytest.raises(PlacementSearchError, match="no uncertainty"):
        calibration(XGBSurrogate(n_estimators=5), placements, frame["score"], splits[:1])


def test_tuning_is_seeded_and_finds_a_good_model(table):
    placements, frame = table
    y = frame["score"].to_numpy()
    a = tune_hyperparameters(LinearSurrogate(alpha=1e3), placements, y, n_trials=6, cv=3, seed=5)
    b = tune_hyperparameters(LinearSurrogate(alpha=1e3), placements, y, n_trials=6, cv=3, seed=5)
    assert a.best_params == b.best_params
    assert a.best_score > 0.98
    assert isinstance(a.trials, pd.DataFrame) and len(a.trials) == 6
    assert a.estimator.alpha == a.best_params["alpha"] and not hasattr(a.estimator, "fit_")
    xgb = tune_hyperparameters(EnsembleSurrogate(XGBSurrogate(), n_members=2), placements[:120], y[:120],
                               n_trials=2, cv=2, seed=0)
    assert all(k.startswith("estimator__") for k in xgb.best_params)


def test_nested_cross_validation(table):
    placements, frame = table
    result = nested_cross_validation(
        LinearSurrogate(), placements, frame["score"], outer_cv=3, inner_cv=2, n_trials=3, seed=0
    )
    assert set(result.metrics["split"]) == {"nested"} and result.metrics["fold"].nunique() == 3
    assert len(result.params) == 3 and "alpha" in result.params.columns
    assert (result.metrics.query("metric == 'spearman'")["value"] > 0.98).all()
