"""How well a surrogate predicts: splits, metrics, learning curves and interval calibration.

Splits (each yields ``(split, fold, train_rows, test_rows)``):

* :func:`kfold_splits` — shuffled k-fold over all rows;
* :func:`ood_splits` — out of distribution: train on the rows tagged ``train_group`` (``uniform``)
  in a ``groups``/``sampler`` column, test on each other tag (``stratified``, ``structured``...).

Metrics (:func:`score_predictions`): R², Spearman, Kendall, RMSE, and precision@top-k inside speed
buckets — the test rows are cut into ``n_buckets`` quantile buckets of ``speed`` (an array per
placement, e.g. from a cost model; when absent, a proxy: minus the number of attention layers),
and inside each the share of the true top ``top_frac`` that the predicted top ``top_frac`` recovers.
Bucket 0 is the slowest.

Everything returns tidy (long) :class:`pandas.DataFrame` s with one value per row;
:func:`summary_table` pivots them into the wide table the CLI prints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import clone
from sklearn.model_selection import KFold

from placement_search.surrogate.base import as_target
from placement_search.surrogate.ensemble import supports_std
from placement_search.surrogate.features import FeatureError, as_onehot, speed_proxy

Split = tuple[str, int, np.ndarray, np.ndarray]
DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95)
METRIC_COLUMNS = ["model", "split", "fold", "n_train", "n_test", "metric", "bucket", "value"]


def take(X: Any, rows: np.ndarray) -> Any:
    """Rows of ``X`` (a list of placements or an array)."""
    if isinstance(X, np.ndarray):
        return X[rows]
    return [X[int(i)] for i in rows]


def num_rows(X: Any) -> int:
    """Number of placements in ``X``."""
    return X.shape[0] if isinstance(X, np.ndarray) else len(X)


# -- metrics ------------------------------------------------------------------------------------


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """R², Spearman ρ, Kendall τ and RMSE (NaN where undefined, e.g. constant targets)."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    var = float(np.var(t))
    mse = float(np.mean((t - p) ** 2))
    out = {"r2": 1.0 - mse / var if var > 0 else float("nan"), "rmse": float(np.sqrt(mse))}
    if t.size < 2 or var == 0 or np.var(p) == 0:
        out.update(spearman=float("nan"), kendall=float("nan"))
    else:
        out["spearman"] = float(stats.spearmanr(t, p).statistic)
        out["kendall"] = float(stats.kendalltau(t, p).statistic)
    return out


def speed_buckets(speed: Any, n_buckets: int = 4) -> np.ndarray:
    """Quantile bucket (0 = slowest) of each speed value; equal speeds share a bucket."""
    s = pd.Series(np.asarray(speed, dtype=np.float64))
    if s.nunique() <= 1:
        return np.zeros(len(s), dtype=np.int64)
    codes = pd.qcut(s, q=min(int(n_buckets), int(s.nunique())), labels=False, duplicates="drop")
    return np.asarray(codes, dtype=np.int64)


def precision_at_top_k(y_true: Any, y_pred: Any, frac: float = 0.1) -> float:
    """Share of the true top ``ceil(frac*n)`` rows that are also in the predicted top ``ceil(frac*n)``."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    k = max(1, int(np.ceil(frac * t.size)))
    true_top = set(np.argsort(-t, kind="stable")[:k].tolist())
    pred_top = set(np.argsort(-p, kind="stable")[:k].tolist())
    return len(true_top & pred_top) / k


def score_predictions(
    y_true: Any,
    y_pred: Any,
    *,
    speed: Any = None,
    n_buckets: int = 4,
    top_frac: float = 0.1,
) -> list[tuple[str, str, float]]:
    """``(metric, bucket, value)`` triples: the regression metrics (bucket ``"all"``) and
    ``precision@top`` per speed bucket (``"0"``..) and their mean (``"mean"``)."""
    rows = [(name, "all", value) for name, value in regression_metrics(y_true, y_pred).items()]
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    metric = f"precision@top{round(100 * top_frac)}%"
    if speed is None:
        rows.append((metric, "all", precision_at_top_k(t, p, top_frac)))
        return rows
    buckets = speed_buckets(speed, n_buckets)
    values = []
    for b in np.unique(buckets):
        mask = buckets == b
        value = precision_at_top_k(t[mask], p[mask], top_frac)
        values.append(value)
        rows.append((metric, str(int(b)), value))
    rows.append((metric, "mean", float(np.mean(values))))
    return rows


def resolve_speed(X: Any, speed: Any) -> np.ndarray:
    """``speed`` as an array, or the proxy ``-(attention layers)`` (fewer attention layers = faster).

    For placements the ``attention`` column is looked up in their space (no such mixer: all zeros,
    one bucket); for one-hot arrays it is column 0, as in the Super Apriel space.
    """
    if speed is not None:
        arr = np.asarray(speed, dtype=np.float64).reshape(-1)
        if arr.shape[0] != num_rows(X):
            raise FeatureError(f"speed: {arr.shape[0]} values for {num_rows(X)} placements")
        if not np.all(np.isfinite(arr)):
            raise FeatureError("speed: holds non-finite values")
        return arr
    oh = as_onehot(X)
    if oh.space is not None and "attention" not in oh.space.mixers:
        return np.zeros(oh.num_samples)
    return -speed_proxy(X, "attention" if oh.space is not None else 0)


# -- splits -------------------------------------------------------------------------------------


def kfold_splits(n: int, cv: int = 5, seed: int = 0) -> Iterator[Split]:
    """Shuffled k-fold splits of ``n`` rows."""
    if not 2 <= int(cv) <= n:
        raise FeatureError(f"cv must be in 2..{n} (number of rows), got {cv}")
    for fold, (tr, te) in enumerate(KFold(int(cv), shuffle=True, random_state=seed).split(np.arange(n))):
        yield "kfold", fold, tr, te


def ood_splits(groups: Any, train_group: str = "uniform", test_groups: Sequence[str] | None = None) -> Iterator[Split]:
    """Train on rows tagged ``train_group``, test on each other tag (``"ood:<tag>"`` splits)."""
    g = np.asarray(groups, dtype=object).astype(str)
    train = np.flatnonzero(g == train_group)
    if train.size == 0:
        raise FeatureError(f"sampler column has no rows tagged {train_group!r} to train on")
    tags = [t for t in pd.unique(g) if t != train_group] if test_groups is None else list(test_groups)
    for tag in tags:
        test = np.flatnonzero(g == tag)
        if test.size:
            yield f"ood:{tag}", 0, train, test


# -- evaluation ---------------------------------------------------------------------------------


def evaluate_splits(
    estimator: Any,
    X: Any,
    y: Any,
    splits: Sequence[Split] | Iterator[Split],
    *,
    model_name: str | None = None,
    speed: Any = None,
    n_buckets: int = 4,
    top_frac: float = 0.1,
) -> pd.DataFrame:
    """Fit a clone on each split's training rows and score its test rows (tidy metrics table)."""
    target = as_target(y, num_rows(X))
    speeds = resolve_speed(X, speed)
    name = model_name or type(estimator).__name__
    records = []
    for split, fold, tr, te in splits:
        model = clone(estimator).fit(take(X, tr), target[tr])
        pred = model.predict(take(X, te))
        for metric, bucket, value in score_predictions(
            target[te], pred, speed=speeds[te], n_buckets=n_buckets, top_frac=top_frac
        ):
            records.append((name, split, fold, tr.size, te.size, metric, bucket, value))
    return pd.DataFrame.from_records(records, columns=METRIC_COLUMNS)


def kfold_validation(estimator: Any, X: Any, y: Any, *, cv: int = 5, seed: int = 0, **kwargs: Any) -> pd.DataFrame:
    """:func:`evaluate_splits` over :func:`kfold_splits`."""
    return evaluate_splits(estimator, X, y, list(kfold_splits(num_rows(X), cv, seed)), **kwargs)


def ood_validation(
    estimator: Any, X: Any, y: Any, groups: Any, *, train_group: str = "uniform", **kwargs: Any
) -> pd.DataFrame:
    """:func:`evaluate_splits` over :func:`ood_splits`."""
    return evaluate_splits(estimator, X, y, list(ood_splits(groups, train_group)), **kwargs)


def validate_surrogate(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    cv: int = 5,
    seed: int = 0,
    groups: Any = None,
    train_group: str = "uniform",
    **kwargs: Any,
) -> pd.DataFrame:
    """k-fold validation, plus out-of-distribution splits when ``groups`` has ``train_group`` and another tag."""
    splits = list(kfold_splits(num_rows(X), cv, seed))
    if groups is not None:
        g = np.asarray(groups, dtype=object).astype(str)
        if (g == train_group).any() and (g != train_group).any():
            splits += list(ood_splits(g, train_group))
    return evaluate_splits(estimator, X, y, splits, **kwargs)


def learning_curve(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    sizes: Sequence[int] = (50, 100, 200, 400, 800),
    test_fraction: float = 0.25,
    repeats: int = 2,
    seed: int = 0,
    model_name: str | None = None,
    speed: Any = None,
    n_buckets: int = 4,
    top_frac: float = 0.1,
) -> pd.DataFrame:
    """Metrics on a fixed held-out set against training-set size (random subsets, ``repeats`` each).

    Sizes larger than the training pool are dropped. Columns: those of :func:`evaluate_splits`
    with ``split = "size"`` and ``fold`` the repeat, plus ``size``.
    """
    n = num_rows(X)
    target = as_target(y, n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = max(1, round(test_fraction * n))
    test, pool = order[:n_test], order[n_test:]
    speeds = resolve_speed(X, speed)
    name = model_name or type(estimator).__name__
    records = []
    for size in sorted({int(s) for s in sizes if 2 <= int(s) <= pool.size}):
        for rep in range(int(repeats)):
            tr = rng.choice(pool, size=size, replace=False)
            model = clone(estimator).fit(take(X, tr), target[tr])
            pred = model.predict(take(X, test))
            for metric, bucket, value in score_predictions(
                target[test], pred, speed=speeds[test], n_buckets=n_buckets, top_frac=top_frac
            ):
                records.append((name, "size", rep, size, test.size, metric, bucket, value, size))
    return pd.DataFrame.from_records(records, columns=[*METRIC_COLUMNS, "size"])


# -- calibration --------------------------------------------------------------------------------


def predict_intervals(model: Any, X: Any, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` interval: ``predict_interval`` if the model has it, else Gaussian from ``return_std``."""
    return interval_bounds(model, X, [level])[level]


def interval_bounds(model: Any, X: Any, levels: Sequence[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Central intervals at several levels from one prediction: ``mean ± q(level)·std`` where ``q`` is
    the model's own ``quantile(level)`` (ensembles: conformal) or the normal quantile."""
    if not supports_std(model):
        raise FeatureError(f"{type(model).__name__} gives no uncertainty; wrap it in EnsembleSurrogate")
    mean, std = model.predict(X, return_std=True)
    out = {}
    for level in levels:
        q = model.quantile(level) if hasattr(model, "quantile") else float(stats.norm.ppf(0.5 + level / 2.0))
        out[level] = (mean - q * std, mean + q * std)
    return out


def interval_coverage(y_true: Any, lower: Any, upper: Any) -> float:
    """Share of ``y_true`` inside ``[lower, upper]``."""
    t = np.asarray(y_true, dtype=np.float64)
    return float(np.mean((t >= np.asarray(lower)) & (t <= np.asarray(upper))))


def calibration(
    estimator: Any,
    X: Any,
    y: Any,
    splits: Sequence[Split] | Iterator[Split],
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
    model_name: str | None = None,
    inflate_ood: bool = False,
    seed: int = 0,
) -> pd.DataFrame:
    """Empirical coverage and mean width of central intervals at each nominal ``level``, per split.

    With ``inflate_ood``, for each ``ood:<tag>`` split of a model with ``calibrate_inflation``
    (ensembles) the test rows are also cut in two random halves: the inflation factor is fitted on
    one half and the coverage measured on the other, both ways round (split ``ood:<tag>+inflated``,
    folds 0 and 1; the factor is in the ``inflation`` column, 1 elsewhere).

    Columns: ``model, split, fold, level, coverage, width, n_test, inflation``.
    """
    target = as_target(y, num_rows(X))
    name = model_name or type(estimator).__name__
    lv = [float(v) for v in levels]
    rng = np.random.default_rng(seed)
    records = []

    def record(model: Any, split: str, fold: int, rows: np.ndarray, factor: float) -> None:
        for level, (lo, hi) in interval_bounds(model, take(X, rows), lv).items():
            coverage = interval_coverage(target[rows], lo, hi)
            records.append((name, split, fold, level, coverage, float(np.mean(hi - lo)), rows.size, factor))

    for split, fold, tr, te in splits:
        model = clone(estimator).fit(take(X, tr), target[tr])
        record(model, split, fold, te, 1.0)
        if inflate_ood and split.startswith("ood:") and hasattr(model, "calibrate_inflation") and te.size >= 4:
            order = rng.permutation(te)
            halves = (order[: te.size // 2], order[te.size // 2 :])
            for half in (0, 1):
                factor = model.calibrate_inflation(take(X, halves[half]), target[halves[half]], lv)
                record(model, f"{split}+inflated", half, halves[1 - half], factor)
            model.inflation_ = 1.0
    return pd.DataFrame.from_records(
        records, columns=["model", "split", "fold", "level", "coverage", "width", "n_test", "inflation"]
    )


# -- reporting ----------------------------------------------------------------------------------


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per (model, split): number of folds, mean training size, total test rows,
    and the fold-mean of each metric (per-bucket precision columns named ``precision@top10%[b]``)."""
    df = metrics.copy()
    df["column"] = np.where(df["bucket"] == "all", df["metric"], df["metric"] + "[" + df["bucket"] + "]")
    wide = df.pivot_table(index=["model", "split"], columns="column", values="value", aggfunc="mean", sort=False)
    first = [c for c in ("r2", "spearman", "kendall", "rmse") if c in wide.columns]
    rest = sorted(c for c in wide.columns if c not in first)
    sizes = (
        df.drop_duplicates(["model", "split", "fold"])
        .groupby(["model", "split"], sort=False)
        .agg(folds=("fold", "size"), n_train=("n_train", "mean"), n_test=("n_test", "sum"))
    )
    sizes["n_train"] = sizes["n_train"].round().astype(int)
    wide = sizes.join(wide[first + rest]).reset_index()
    wide.columns.name = None
    return wide
