"""Two-objective Pareto fronts: non-dominated filtering and hypervolume.

Conventions: both objectives are *maximised* (quality, throughput). To minimise a cost, pass its
negative. Ties: a point equal to another in both objectives is kept once.
"""

from __future__ import annotations

import numpy as np


def pareto_mask(objectives: np.ndarray) -> np.ndarray:
    """Boolean mask ``[P]`` of the non-dominated rows of ``objectives [P, 2]`` (both maximised).

    A point is dominated when another is >= in both objectives and > in at least one. Of several
    identical points only the first is kept.
    """
    obj = np.asarray(objectives, dtype=np.float64)
    if obj.ndim != 2 or obj.shape[1] != 2:
        raise ValueError(f"objectives must be [P, 2], got {obj.shape}")
    n = obj.shape[0]
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    # Sort by the first objective descending, then the second descending; sweep keeping a running
    # maximum of the second objective: a point survives iff it beats every earlier one there.
    order = np.lexsort((-obj[:, 1], -obj[:, 0]))
    order = order[~np.isnan(obj[order]).any(axis=1)]  # NaN rows are never on the front
    if order.size == 0:
        return keep
    second = obj[order, 1]
    earlier_best = np.concatenate([[-np.inf], np.maximum.accumulate(second)[:-1]])
    keep[order[second > earlier_best]] = True
    return keep


def hypervolume(objectives: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by ``objectives [P, 2]`` (maximised) and bounded below by ``reference``.

    Points not strictly better than the reference in both objectives add nothing.
    """
    obj = np.asarray(objectives, dtype=np.float64).reshape(-1, 2)
    r0, r1 = reference
    obj = obj[(obj[:, 0] > r0) & (obj[:, 1] > r1)]
    if obj.size == 0:
        return 0.0
    front = obj[pareto_mask(obj)]
    front = front[np.argsort(-front[:, 0])]  # first objective descending, second ascending
    area, last1 = 0.0, r1
    for a, b in front:
        area += (a - r0) * (b - last1)
        last1 = b
    return float(area)
