"""One call from an evaluation table to a validated surrogate (what ``placement-search fit`` runs).

:func:`fit_and_validate` builds the named surrogate, validates it (k-fold, plus out-of-distribution
splits when the table has ``uniform`` rows and others), optionally tunes it with Optuna in nested
cross-validation, optionally measures interval coverage, and fits the final model on every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from placement_search.errors import PlacementSearchError
from placement_search.surrogate import registry, tuning, validation
from placement_search.surrogate.table import EvaluationTable


@dataclass
class FitReport:
    """Result of :func:`fit_and_validate`."""

    model: Any
    metrics: pd.DataFrame
    summary: pd.DataFrame
    calibration: pd.DataFrame | None
    tuned_params: dict[str, Any] | None


def has_ood_groups(groups: Any, train_group: str = "uniform") -> bool:
    """Whether ``groups`` holds ``train_group`` rows and rows of another tag."""
    if groups is None:
        return False
    tags = set(np.asarray(groups, dtype=object).astype(str).tolist())
    return train_group in tags and len(tags) > 1


def fit_and_validate(
    data: EvaluationTable,
    surrogate: str = "xgb",
    *,
    cv: int = 5,
    seed: int = 0,
    n_buckets: int = 4,
    top_frac: float = 0.1,
    tune: bool = False,
    n_trials: int = tuning.DEFAULT_TRIALS,
    inner_cv: int = 3,
    calibration: bool = False,
) -> FitReport:
    """Validate the named surrogate on ``data`` and return it fitted on all rows.

    With ``tune``, the k-fold numbers come from nested cross-validation (``split="nested"``), the
    out-of-distribution splits use parameters tuned on the training group only, and the final
    model uses parameters tuned on all rows.
    """
    if cv < 2:
        raise PlacementSearchError(f"cv must be at least 2, got {cv}")
    if len(data) < cv:
        raise PlacementSearchError(f"{data.source}: {len(data)} rows, fewer than the {cv} CV folds")
    if not 0.0 < top_frac <= 1.0:
        raise PlacementSearchError(f"top fraction must be in (0, 1], got {top_frac}")
    estimator = registry.make_surrogate(surrogate, seed)
    X, y = data.placements, data.y
    common = {"model_name": surrogate, "speed": data.speed, "n_buckets": n_buckets, "top_frac": top_frac}
    tuned_params = None
    if tune:
        nested = tuning.nested_cross_validation(
            estimator, X, y, outer_cv=cv, inner_cv=inner_cv, n_trials=n_trials, seed=seed, **common
        )
        frames = [nested.metrics]
        if has_ood_groups(data.groups):
            ood = list(validation.ood_splits(data.groups))
            train = ood[0][2]
            on_train = tuning.tune_hyperparameters(
                estimator, validation.take(X, train), y[train], n_trials=n_trials, cv=inner_cv, seed=seed
            )
            frames.append(validation.evaluate_splits(on_train.estimator, X, y, ood, **common))
        result = tuning.tune_hyperparameters(estimator, X, y, n_trials=n_trials, cv=inner_cv, seed=seed)
        final, tuned_params = result.estimator, result.best_params
        metrics = pd.concat(frames, ignore_index=True)
    else:
        metrics = validation.validate_surrogate(estimator, X, y, cv=cv, seed=seed, groups=data.groups, **common)
        final = estimator
    cal = None
    if calibration:
        splits = list(validation.kfold_splits(len(data), cv, seed))
        cal = validation.calibration(final, X, y, splits, model_name=surrogate)
    return FitReport(final.fit(X, y), metrics, validation.summary_table(metrics), cal, tuned_params)
