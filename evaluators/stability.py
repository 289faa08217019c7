"""Ranking stability: do the placements rank alike at another checkpoint (earlier in training, or another run)?

A search trusts the ranking of placements by quality. When the checkpoint that was evaluated is not the one that will
be served (an intermediate snapshot, a re-run of the same recipe), what matters is whether the placements keep their
order. :func:`ranking_stability` compares each checkpoint's aggregate scores (retention against its own
all-attention placement, :func:`~placement_search.evaluators.dataset.wide_scores`) with a reference's on the
placements both evaluated: Spearman and Kendall rank correlations, and how many of the reference's best decile are
also in the checkpoint's best decile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from placement_search.errors import PlacementSearchError
from placement_search.evaluators.dataset import wide_scores


def compare_scores(score: pd.Series, reference: pd.Series, top: float = 0.1) -> dict[str, Any]:
    """Agreement of two per-placement score Series (indexed by placement code) on their common placements."""
    common = score.index.intersection(reference.index)
    a, b = score.loc[common].astype(float), reference.loc[common].astype(float)
    ok = np.isfinite(a.to_numpy()) & np.isfinite(b.to_numpy())
    a, b = a[ok], b[ok]
    n = len(a)
    if n < 3:
        raise PlacementSearchError(f"only {n} placements in common: too few to compare rankings")
    k = max(1, round(top * n))
    best_a, best_b = set(a.nlargest(k).index), set(b.nlargest(k).index)
    return {
        "placements": n,
        "spearman": float(stats.spearmanr(a, b).statistic),
        "kendall": float(stats.kendalltau(a, b).statistic),
        f"top{int(top * 100)}_overlap": len(best_a & best_b) / k,
        "mean_abs_diff": float(np.mean(np.abs(a.to_numpy() - b.to_numpy()))),
    }


def ranking_stability(
    tables: Mapping[str, pd.DataFrame], reference: str, *, top: float = 0.1
) -> pd.DataFrame:
    """One row per table name: :func:`compare_scores` of its ``score`` column against ``tables[reference]``'s.

    ``tables``: name -> a wide table (``placement``, ``score``, ...) such as :func:`wide_scores` returns.
    """
    if reference not in tables:
        raise PlacementSearchError(f"reference {reference!r} is not among {', '.join(tables)}")
    ref = tables[reference].set_index("placement").score
    rows = [{"checkpoint": name, **compare_scores(t.set_index("placement").score, ref, top)}
            for name, t in tables.items() if name != reference]  # fmt: skip
    return pd.DataFrame(rows)


def checkpoint_tables(long: pd.DataFrame, sample_set: str = "a") -> dict[str, pd.DataFrame]:
    """:func:`wide_scores` of every checkpoint of a tidy table (``load_dataset``), by checkpoint name."""
    names = sorted(long.loc[long.sample_set == sample_set, "checkpoint"].unique())
    return {name: wide_scores(long, name, sample_set) for name in names}
