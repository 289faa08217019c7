"""The common base of the surrogates: featurizing ``X`` and remembering what the model was fitted on.

A surrogate is a scikit-learn regressor (``fit``, ``predict``, ``score``, ``get_params``,
``set_params``, ``clone`` all work). Its ``X`` is a list of placements or the one-hot array, see
:mod:`placement_search.surrogate.features`. After ``fit`` it holds ``num_layers_``,
``num_mixers_``, ``n_features_in_`` and, when fitted on placements, ``space_``.

For saving without pickle each surrogate turns its fitted state into JSON plus named binary files
(:meth:`SurrogateBase.get_state`) and back (:meth:`SurrogateBase.set_state`); see
:mod:`placement_search.surrogate.persistence`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from placement_search.placement import SearchSpace
from placement_search.surrogate.features import FeatureError, OneHot, as_onehot


def as_target(y: Any, n: int) -> np.ndarray:
    """``y`` as a finite float64 vector of length ``n``."""
    try:
        arr = np.asarray(y, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise FeatureError("y: target values are not numeric") from None
    if arr.shape[0] != n:
        raise FeatureError(f"y: {arr.shape[0]} target values for {n} placements")
    if not np.all(np.isfinite(arr)):
        raise FeatureError(f"y: value at row {int(np.argwhere(~np.isfinite(arr))[0, 0])} is not finite")
    return arr


class SurrogateBase(RegressorMixin, BaseEstimator, ABC):
    """Shared featurizing and bookkeeping; subclasses implement ``_fit`` and ``_predict``."""

    # -- featurizing ------------------------------------------------------------------------------

    def _onehot_fit(self, X: Any, y: Any) -> tuple[OneHot, np.ndarray]:
        oh = as_onehot(X)
        target = as_target(y, oh.num_samples)
        self.num_layers_ = oh.num_layers
        self.num_mixers_ = oh.num_mixers
        self.n_features_in_ = oh.num_layers * oh.num_mixers
        self.space_: SearchSpace | None = oh.space
        return oh, target

    def _onehot(self, X: Any) -> OneHot:
        check_is_fitted(self, "num_layers_")
        return as_onehot(X, num_layers=self.num_layers_, num_mixers=self.num_mixers_)

    # -- persistence protocol -------------------------------------------------------------------

    def _base_state(self) -> dict[str, Any]:
        check_is_fitted(self, "num_layers_")
        return {
            "num_layers": int(self.num_layers_),
            "num_mixers": int(self.num_mixers_),
            "space": None if self.space_ is None else self.space_.to_dict(),
        }

    def _set_base_state(self, state: dict[str, Any]) -> None:
        self.num_layers_ = int(state["num_layers"])
        self.num_mixers_ = int(state["num_mixers"])
        self.n_features_in_ = self.num_layers_ * self.num_mixers_
        space = state.get("space")
        self.space_ = None if space is None else SearchSpace.from_dict(space)

    @abstractmethod
    def get_state(self, covariance: str = "design") -> tuple[dict[str, Any], dict[str, bytes]]:
        """The fitted state as a JSON-ready dict and named binary files (no pickle).

        ``covariance`` is the on-disk form of a posterior covariance, for the models that have one."""

    @abstractmethod
    def set_state(self, state: dict[str, Any], files: dict[str, bytes]) -> None:
        """Restore what :meth:`get_state` returned (``files`` maps the same names to bytes)."""


