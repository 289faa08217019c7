"""Hyperparameter tuning with Optuna, and nested cross-validation to score it honestly.

Off by default everywhere (the CLI's ``--tune``). :func:`tune_hyperparameters` runs a seeded TPE
study whose objective is the mean inner-CV score (Spearman by default) and returns the best
parameters; :func:`nested_cross_validation` repeats that inside every outer fold and scores the
tuned model on the outer test rows, so the reported numbers do not reuse the data that chose the
parameters.

Search spaces (:func:`suggest_params`) exist for every surrogate class; an ensemble tunes its base
estimator (``estimator__*`` parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd
from sklearn.base import clone

from placement_search.surrogate.base import as_target
from placement_search.surrogate.cluster import ClusterExpansion
from placement_search.surrogate.ensemble import EnsembleSurrogate
from placement_search.surrogate.features import FeatureError
from placement_search.surrogate.linear import LinearSurrogate
from placement_search.surrogate.validation import (
    METRIC_COLUMNS,
    kfold_splits,
    num_rows,
    regression_metrics,
    resolve_speed,
    score_predictions,
    take,
)
from placement_search.surrogate.xgb import XGBSurrogate

#: Small default budget: tuning is opt-in and the CLI runs it on 2 cores.
DEFAULT_TRIALS = 20
SCORINGS = ("spearman", "kendall", "r2")


def suggest_params(trial: optuna.Trial, estimator: Any, prefix: str = "") -> dict[str, Any]:
    """Sample ``set_params`` keyword arguments for ``estimator`` from ``trial``."""
    if isinstance(estimator, EnsembleSurrogate):
        return suggest_params(trial, estimator._base(), prefix=f"{prefix}estimator__")
    p = prefix
    if isinstance(estimator, XGBSurrogate):
        return {
            f"{p}n_estimators": trial.suggest_int(f"{p}n_estimators", 100, 1000, log=True),
            f"{p}max_depth": trial.suggest_int(f"{p}max_depth", 1, 6),
            f"{p}learning_rate": trial.suggest_float(f"{p}learning_rate", 0.01, 0.3, log=True),
            f"{p}subsample": trial.suggest_float(f"{p}subsample", 0.5, 1.0),
            f"{p}colsample_bytree": trial.suggest_float(f"{p}colsample_bytree", 0.3, 1.0),
            f"{p}min_child_weight": trial.suggest_float(f"{p}min_child_weight", 0.5, 10.0, log=True),
            f"{p}reg_lambda": trial.suggest_float(f"{p}reg_lambda", 1e-3, 10.0, log=True),
            f"{p}include_counts": trial.suggest_categorical(f"{p}include_counts", [False, True]),
        }
    if isinstance(estimator, LinearSurrogate):
        out: dict[str, Any] = {
            f"{p}include_counts": trial.suggest_categorical(f"{p}include_counts", [False, True])
        }
        if estimator.prior == "ridge":
            out[f"{p}alpha"] = trial.suggest_float(f"{p}alpha", 1e-3, 1e3, log=True)
        return out
    if isinstance(estimator, ClusterExpansion):
        out = {f"{p}max_distance": trial.suggest_int(f"{p}max_distance", 1, 3)}
        if estimator.prior == "ridge":
            out[f"{p}alpha"] = trial.suggest_float(f"{p}alpha", 1e-3, 1e2, log=True)
            out[f"{p}pair_alpha"] = trial.suggest_float(f"{p}pair_alpha", 1e-2, 1e3, log=True)
        return out
    raise FeatureError(f"no tuning search space for {type(estimator).__name__}")


def _score(y_true: np.ndarray, y_pred: np.ndarray, scoring: str) -> float:
    value = regression_metrics(y_true, y_pred)[scoring]
    return value if np.isfinite(value) else -1.0


@dataclass
class TuningResult:
    """Outcome of :func:`tune_hyperparameters`."""

    best_params: dict[str, Any]
    best_score: float
    estimator: Any
    trials: pd.DataFrame


def tune_hyperparameters(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    n_trials: int = DEFAULT_TRIALS,
    cv: int = 3,
    seed: int = 0,
    scoring: str = "spearman",
) -> TuningResult:
    """Seeded TPE search maximising the mean ``cv``-fold ``scoring``; returns an unfitted tuned clone."""
    if scoring not in SCORINGS:
        raise FeatureError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    if int(n_trials) < 1:
        raise FeatureError(f"n_trials must be at least 1, got {n_trials}")
    target = as_target(y, num_rows(X))
    folds = list(kfold_splits(num_rows(X), cv, seed))
    if isinstance(estimator, EnsembleSurrogate) and estimator.estimator is None:
        estimator = clone(estimator).set_params(estimator=estimator._base())

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, estimator)
        scores = []
        for _, _, tr, te in folds:
            model = clone(estimator).set_params(**params).fit(take(X, tr), target[tr])
            scores.append(_score(target[te], model.predict(take(X, te)), scoring))
        return float(np.mean(scores))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=int(n_trials))
    best = suggest_params(optuna.trial.FixedTrial(study.best_params), estimator)
    trials = study.trials_dataframe(attrs=("number", "value", "params"))
    return TuningResult(best, float(study.best_value), clone(estimator).set_params(**best), trials)


@dataclass
class NestedCVResult:
    """Outer-fold metrics (tidy, like :func:`~placement_search.surrogate.validation.evaluate_splits`)
    and the parameters chosen in each outer fold."""

    metrics: pd.DataFrame
    params: pd.DataFrame


def nested_cross_validation(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    outer_cv: int = 5,
    inner_cv: int = 3,
    n_trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    scoring: str = "spearman",
    model_name: str | None = None,
    speed: Any = None,
    n_buckets: int = 4,
    top_frac: float = 0.1,
) -> NestedCVResult:
    """Tune on each outer fold's training rows (inner CV), score on its test rows (``split="nested"``)."""
    target = as_target(y, num_rows(X))
    speeds = resolve_speed(X, speed)
    name = model_name or type(estimator).__name__
    records: list[tuple[Any, ...]] = []
    chosen = []
    for _, fold, tr, te in kfold_splits(num_rows(X), outer_cv, seed):
        result = tune_hyperparameters(
            estimator, take(X, tr), target[tr], n_trials=n_trials, cv=inner_cv, seed=seed + fold, scoring=scoring
        )
        model = result.estimator.fit(take(X, tr), target[tr])
        pred = model.predict(take(X, te))
        for metric, bucket, value in score_predictions(
            target[te], pred, speed=speeds[te], n_buckets=n_buckets, top_frac=top_frac
        ):
            records.append((name, "nested", fold, tr.size, te.size, metric, bucket, value))
        chosen.append({"model": name, "fold": fold, "inner_score": result.best_score, **result.best_params})
    return NestedCVResult(pd.DataFrame.from_records(records, columns=METRIC_COLUMNS), pd.DataFrame(chosen))
