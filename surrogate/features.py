"""Featurizing placements for the surrogates.

Every surrogate accepts ``X`` as either

* a sequence of :class:`~placement_search.placement.Placement` (all from one search space), or
* the flattened one-hot array ``[P, N*M]`` of :func:`~placement_search.placement.one_hot_matrix`
  (layer-major: column ``l*M + m`` is 1 when layer ``l`` uses mixer ``m``), or its ``[P, N, M]`` form.

:func:`as_onehot` turns either into a validated :class:`OneHot`. For an array, the number of layers
``N`` is read off the row sums (each layer contributes exactly one 1) and ``M = D / N``, so no
search space is needed. The design matrices built on top of it are:

* :func:`count_features` — layers per mixer, ``[P, M]`` (the optional "mixer counts" features);
* :func:`pair_features` — ``1[x_l = a] * 1[x_{l+d} = b]`` for ``l = 0..N-d-1``, flattened
  ``[P, (N-d)*M*M]`` in ``(l, a, b)`` order (used by the cluster expansion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement, SearchSpace, one_hot_matrix

#: What the surrogates accept as ``X``.
PlacementsLike = Sequence[Placement] | np.ndarray


class FeatureError(PlacementSearchError):
    """``X`` is not a list of placements nor a valid one-hot array."""


@dataclass(frozen=True)
class OneHot:
    """A validated one-hot batch: ``matrix`` is ``[P, N*M]`` float64, layer-major."""

    matrix: np.ndarray
    num_layers: int
    num_mixers: int
    space: SearchSpace | None = None

    @property
    def num_samples(self) -> int:
        return int(self.matrix.shape[0])

    def cube(self) -> np.ndarray:
        """The ``[P, N, M]`` view."""
        return self.matrix.reshape(-1, self.num_layers, self.num_mixers)

    def indices(self) -> np.ndarray:
        """Mixer column of each layer, ``[P, N]`` int64."""
        return self.cube().argmax(axis=2)


def as_onehot(X: Any, *, num_layers: int | None = None, num_mixers: int | None = None) -> OneHot:
    """Validate ``X`` (placements or one-hot array) and return its :class:`OneHot` form.

    ``num_layers``/``num_mixers``, when given (e.g. by a fitted model), must match what ``X`` holds;
    they also let an ``[P, N*M]`` batch with ``P == 0`` be checked.
    """
    space: SearchSpace | None = None
    if isinstance(X, Placement):
        X = [X]
    if isinstance(X, np.ndarray) or hasattr(X, "to_numpy"):
        arr = np.asarray(X.to_numpy() if hasattr(X, "to_numpy") else X)
        if arr.dtype == object:
            items = list(arr.ravel()) if arr.ndim <= 1 else None
            if items is not None and items and all(isinstance(p, Placement) for p in items):
                return as_onehot(items, num_layers=num_layers, num_mixers=num_mixers)
            raise FeatureError("X: object array that is not a list of Placements")
        matrix, n, m = _from_array(arr, num_layers, num_mixers)
    elif isinstance(X, Sequence) and not isinstance(X, (str, bytes)):
        items = list(X)
        if not items:
            raise FeatureError("X: no placements given")
        bad = next((i for i, p in enumerate(items) if not isinstance(p, Placement)), None)
        if bad is not None:
            raise FeatureError(f"X[{bad}]: expected a Placement, got {type(items[bad]).__name__}")
        space = items[0].space
        if any(p.space != space for p in items):
            raise FeatureError("X: placements come from different search spaces")
        matrix = one_hot_matrix(items, dtype=np.float64)
        n, m = space.num_layers, space.num_mixers
    else:
        raise FeatureError(f"X: expected a list of Placements or a one-hot array, got {type(X).__name__}")
    if num_layers is not None and n != num_layers:
        raise FeatureError(f"X: placements have {n} layers, the model was fitted on {num_layers}")
    if num_mixers is not None and m != num_mixers:
        raise FeatureError(f"X: placements have {m} mixers per layer, the model was fitted on {num_mixers}")
    return OneHot(matrix, n, m, space)


def _from_array(arr: np.ndarray, num_layers: int | None, num_mixers: int | None) -> tuple[np.ndarray, int, int]:
    if arr.ndim == 3:
        p, n, m = arr.shape
        arr = arr.reshape(p, n * m)
    elif arr.ndim != 2:
        raise FeatureError(f"X: one-hot array must be [P, N*M] or [P, N, M], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise FeatureError("X: no rows")
    try:
        matrix = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        raise FeatureError(f"X: one-hot array has non-numeric dtype {arr.dtype}") from None
    if not np.all((matrix == 0) | (matrix == 1)):
        row = int(np.argwhere(~((matrix == 0) | (matrix == 1)))[0, 0])
        raise FeatureError(f"X: row {row} is not one-hot (values other than 0 and 1)")
    sums = matrix.sum(axis=1)
    n = num_layers if num_layers is not None else int(sums[0])
    if n <= 0 or matrix.shape[1] % n:
        raise FeatureError(f"X: row 0 has {int(sums[0])} ones, which does not divide its {matrix.shape[1]} columns")
    m = matrix.shape[1] // n
    if num_mixers is not None and m != num_mixers:
        raise FeatureError(f"X: {matrix.shape[1]} columns, expected {n}*{num_mixers}")
    per_layer = matrix.reshape(-1, n, m).sum(axis=2)
    if not np.all(per_layer == 1):
        row, layer = (int(v) for v in np.argwhere(per_layer != 1)[0])
        raise FeatureError(f"X: row {row}, layer {layer} does not have exactly one mixer set")
    return matrix, n, m


def count_features(onehot: OneHot) -> np.ndarray:
    """Layers per mixer, ``[P, M]`` float64."""
    return onehot.cube().sum(axis=1)


def pair_features(onehot: OneHot, distance: int) -> np.ndarray:
    """Pair indicators ``1[x_l=a]·1[x_{l+d}=b]`` as ``[P, (N-d)*M*M]`` in ``(l, a, b)`` order."""
    n, m = onehot.num_layers, onehot.num_mixers
    if not 1 <= distance < n:
        raise FeatureError(f"pair distance {distance} must be in 1..{n - 1}")
    cube = onehot.cube()
    pairs = cube[:, : n - distance, :, None] * cube[:, distance:, None, :]
    return pairs.reshape(cube.shape[0], (n - distance) * m * m)


def speed_proxy(X: Any, mixer: str | int = "attention") -> np.ndarray:
    """Number of layers using ``mixer`` per placement (a stand-in for speed until a cost model exists).

    ``mixer`` is a name (needs placements, or the Super Apriel order for arrays when it is one of
    ``attention, sliding_window, gdn, kda``) or a column index.
    """
    oh = as_onehot(X)
    if isinstance(mixer, str):
        if oh.space is not None:
            column = oh.space.index(mixer)
        else:
            default = ("attention", "sliding_window", "gdn", "kda")
            if mixer not in default or oh.num_mixers != len(default):
                raise FeatureError(f"speed proxy: cannot find mixer {mixer!r} in an array without a search space")
            column = default.index(mixer)
    else:
        column = int(mixer)
    if not 0 <= column < oh.num_mixers:
        raise FeatureError(f"speed proxy: mixer column {column} out of range 0..{oh.num_mixers - 1}")
    return count_features(oh)[:, column]
