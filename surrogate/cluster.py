"""The cluster expansion: per-layer terms plus pair terms for nearby layers (the Super Apriel model).

Quality is modelled as

    f(x) = intercept_ + sum_l unary_[l, x_l] + sum_{d=1..D} sum_{l=0..N-d-1} pair_[d][l, x_l, x_{l+d}]

with ``D = max_distance`` (3 by default), fitted by linear regression on the indicator features
``1[x_l = a]`` and ``1[x_l = a]·1[x_{l+d} = b]`` under a Gaussian prior (fixed ridge penalties, with
``pair_alpha`` for the pair weights, or :class:`~sklearn.linear_model.BayesianRidge`).

Array layout (for an exact dynamic-programming search over layers):

* ``unary_``: ``[N, M]`` float64; ``unary_[l, a]`` is the contribution of mixer ``a`` at layer ``l``.
* ``pair_``: ``dict[int, ndarray]``; ``pair_[d]`` is ``[N-d, M, M]`` and ``pair_[d][l, a, b]`` is the
  contribution of mixer ``a`` at layer ``l`` together with mixer ``b`` at layer ``l+d``.
* ``intercept_``: float.

Mixer columns follow the search space order (``space_.mixers``). The arrays are gauge-fixed: each
pair matrix ``pair_[d][l]`` has zero row and column means, and each row of ``unary_`` has zero mean
(the removed parts are moved into ``unary_`` and ``intercept_``), so they are unique and comparable
across fits; the formula above reproduces ``predict`` exactly (up to rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from placement_search.surrogate.base import SurrogateBase
from placement_search.surrogate.features import FeatureError, OneHot, count_features, pair_features
from placement_search.surrogate.linear import (
    fit_from_state,
    fit_gaussian_linear,
    fit_state,
    indices_to_onehot,
)


def canonicalize(
    unary: np.ndarray, pair: dict[int, np.ndarray], intercept: float
) -> tuple[np.ndarray, dict[int, np.ndarray], float]:
    """Gauge-fix a cluster expansion (zero-mean pair rows/columns and unary rows); predictions unchanged."""
    unary = np.array(unary, dtype=np.float64, copy=True)
    out_pair: dict[int, np.ndarray] = {}
    for d, mats in sorted(pair.items()):
        mats = np.asarray(mats, dtype=np.float64)
        rows = mats.mean(axis=2, keepdims=True)  # [N-d, M, 1]
        cols = mats.mean(axis=1, keepdims=True)  # [N-d, 1, M]
        grand = mats.mean(axis=(1, 2), keepdims=True)
        out_pair[d] = mats - rows - cols + grand
        unary[: unary.shape[0] - d] += (rows - grand)[:, :, 0]
        unary[d:] += (cols - grand)[:, 0, :]
        intercept += float(grand.sum())
    means = unary.mean(axis=1, keepdims=True)
    return unary - means, out_pair, float(intercept + means.sum())


def evaluate_expansion(
    indices: np.ndarray, unary: np.ndarray, pair: dict[int, np.ndarray], intercept: float
) -> np.ndarray:
    """``f(x)`` of the formula in the module docstring for mixer indices ``[P, N]``."""
    idx = np.atleast_2d(indices)
    n = unary.shape[0]
    layers = np.arange(n)
    out = np.full(idx.shape[0], float(intercept))
    out += unary[layers[None, :], idx].sum(axis=1)
    for d, mats in pair.items():
        left = layers[: n - d]
        out += mats[left[None, :], idx[:, : n - d], idx[:, d:]].sum(axis=1)
    return out


class ClusterExpansion(SurrogateBase):
    """Per-layer plus short-range pair terms under a Gaussian prior (see the module docstring).

    Parameters
    ----------
    max_distance:
        Pair terms for layers ``l`` and ``l+d`` with ``d = 1..max_distance``.
    alpha:
        Ridge penalty of the per-layer (and count) weights, for ``prior="ridge"``.
    pair_alpha:
        Ridge penalty of the pair weights (``None``: same as ``alpha``), for ``prior="ridge"``.
    prior:
        ``"ridge"`` or ``"bayesian"`` (evidence-maximised precisions, one prior for all weights).
    include_counts:
        Add layers-per-mixer counts as extra features (folded into ``unary_`` after the fit).
    """

    def __init__(
        self,
        max_distance: int = 3,
        alpha: float = 1.0,
        pair_alpha: float | None = None,
        prior: str = "bayesian",
        include_counts: bool = False,
    ) -> None:
        self.max_distance = max_distance
        self.alpha = alpha
        self.pair_alpha = pair_alpha
        self.prior = prior
        self.include_counts = include_counts

    # -- design -------------------------------------------------------------------------------

    def _distances(self, num_layers: int) -> list[int]:
        if int(self.max_distance) < 0:
            raise FeatureError(f"max_distance must be >= 0, got {self.max_distance}")
        return list(range(1, min(int(self.max_distance), num_layers - 1) + 1))

    def _blocks(self, oh: OneHot) -> list[tuple[str, np.ndarray]]:
        blocks = [("unary", oh.matrix)]
        if self.include_counts:
            blocks.append(("counts", count_features(oh)))
        for d in self._distances(oh.num_layers):
            blocks.append((f"pair{d}", pair_features(oh, d)))
        return blocks

    def _design(self, oh: OneHot) -> np.ndarray:
        return np.hstack([b for _, b in self._blocks(oh)])

    def _width(self) -> int:
        n, m = self.num_layers_, self.num_mixers_
        width = n * m + (m if self.include_counts else 0)
        return width + sum((n - d) * m * m for d in self._distances(n))

    # -- fit / predict ------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> ClusterExpansion:
        """Fit on placements (or one-hot rows) ``X`` and targets ``y``."""
        oh, target = self._onehot_fit(X, y)
        blocks = self._blocks(oh)
        pair_alpha = float(self.alpha if self.pair_alpha is None else self.pair_alpha)
        penalty = np.concatenate(
            [np.full(b.shape[1], pair_alpha if name.startswith("pair") else float(self.alpha)) for name, b in blocks]
        )
        self.fit_ = fit_gaussian_linear(np.hstack([b for _, b in blocks]), target, self.prior, penalty)
        self.training_indices_ = oh.indices().astype(np.int8)
        self._finish()
        return self

    def _finish(self) -> None:
        n, m = self.num_layers_, self.num_mixers_
        coef = self.fit_.coef
        unary = coef[: n * m].reshape(n, m).copy()
        pos = n * m
        if self.include_counts:
            unary += coef[pos : pos + m][None, :]
            pos += m
        pair: dict[int, np.ndarray] = {}
        for d in self._distances(n):
            size = (n - d) * m * m
            pair[d] = coef[pos : pos + size].reshape(n - d, m, m)
            pos += size
        self.unary_, self.pair_, self.intercept_ = canonicalize(unary, pair, self.fit_.intercept)
        self.coef_ = coef
        self.noise_std_ = float(np.sqrt(self.fit_.noise_var))

    def predict(self, X: Any, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predicted quality; with ``return_std`` also the posterior predictive standard deviation."""
        design = self._design(self._onehot(X))
        mean = self.fit_.predict(design)
        if return_std:
            return mean, self.fit_.predict_std(design)
        return mean

    def expansion(self) -> tuple[np.ndarray, dict[int, np.ndarray], float]:
        """``(unary_, pair_, intercept_)`` — the arrays a layer-by-layer DP search needs."""
        return self.unary_, self.pair_, self.intercept_

    # -- persistence --------------------------------------------------------------------------

    def get_state(self, covariance: str = "design") -> tuple[dict[str, Any], dict[str, bytes]]:
        """State and files; ``covariance`` is the on-disk form of the posterior (see :mod:`.linear`)."""
        state, files = fit_state(self.fit_, covariance, getattr(self, "training_indices_", None))
        return {**self._base_state(), "fit": state}, files

    def set_state(self, state: dict[str, Any], files: dict[str, bytes]) -> None:
        self._set_base_state(state)
        self.fit_, self.training_indices_ = fit_from_state(
            state["fit"],
            files,
            self._width(),
            lambda idx: self._design(indices_to_onehot(idx, self.num_mixers_)),
            self.num_layers_,
            self.num_mixers_,
        )
        self._finish()
