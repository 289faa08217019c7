"""Reproduction: are a campaign's scores the same numbers as a reference table's, for the same keys?

A change that should not move any score (a faster kernel with the same arithmetic, another machine of the same
kind, CUDA graphs) is accepted by scoring placements again into an empty database and comparing every metric value
with the shipped table's under the same checkpoint hash, placement, task, settings hash and metric.
:func:`score_reproduction` counts the values that are bitwise equal and gives the largest relative difference of
the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from placement_search.errors import PlacementSearchError

KEY = ["checkpoint_hash", "placement", "task", "settings_hash", "metric"]


def score_reproduction(new: pd.DataFrame, reference: pd.DataFrame) -> dict[str, Any]:
    """Compare the ``value`` of every row of ``new`` with ``reference``'s row of the same :data:`KEY`.

    Both are tidy tables (``tidy_results`` / ``load_dataset``). Returns counts (``values``, ``placements``,
    ``bitwise_equal``, ``unmatched``: rows of ``new`` the reference lacks), ``max_rel_diff`` over the matched values
    and up to five differing rows. Raises when no row matches (another checkpoint or settings, say).
    """
    for name, frame in (("new", new), ("reference", reference)):
        missing = [c for c in (*KEY, "value") if c not in frame.columns]
        if missing:
            raise PlacementSearchError(f"{name} table lacks column(s) {', '.join(missing)}")
    ref = reference[[*KEY, "value"]].drop_duplicates(KEY)
    both = new[[*KEY, "value"]].merge(ref, on=KEY, how="left", suffixes=("", "_ref"), indicator=True)
    matched = both[both["_merge"] == "both"]
    if matched.empty:
        raise PlacementSearchError("no row of the new scores has a reference row with the same checkpoint hash, "
                                   "placement, task, settings hash and metric")
    a, b = matched.value.to_numpy(float), matched.value_ref.to_numpy(float)
    equal = (a == b) | (np.isnan(a) & np.isnan(b))
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-300)
    differing = matched[~equal].assign(rel_diff=rel[~equal]).sort_values("rel_diff", ascending=False)
    return {
        "values": len(matched),
        "placements": int(matched.placement.nunique()),
        "bitwise_equal": int(equal.sum()),
        "unmatched": int(len(both) - len(matched)),
        "max_rel_diff": float(np.nanmax(np.where(equal, 0.0, rel))),
        "worst": differing.head(5).drop(columns="_merge").to_dict(orient="records"),
    }
