"""Ensembles over any surrogate: uncertainty for models that have none (and better for those that do).

:class:`EnsembleSurrogate` fits ``n_members`` clones of a base estimator, each on a bootstrap
resample (``resample="bootstrap"``), a subsample without replacement (``"subsample"``, 80%), or
all rows with a different seed (``"none"``). Its prediction is the members' mean and its standard
deviation combines

* the spread of the members' means (model uncertainty),
* the mean of the members' own predictive variances when the base has ``predict(X, return_std=True)``
  (the linear and cluster models), otherwise a noise variance estimated from out-of-bag residuals.

``predict_interval(X, alpha)`` gives the central ``1 - alpha`` interval ``mean ± q·std``. With
``interval="conformal"`` (default) ``q`` is the finite-sample-corrected quantile of the
out-of-bag normalised residuals ``|y - oob_mean| / std`` (a normalised split-conformal rule, so
coverage holds on data like the training data whatever the base model); with ``"gaussian"``, or
when there are no out-of-bag rows (``resample="none"``), ``q`` is the normal quantile.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from scipy import stats
from sklearn.base import clone

from placement_search.surrogate.base import SurrogateBase
from placement_search.surrogate.features import FeatureError
from placement_search.surrogate.xgb import XGBSurrogate

RESAMPLES = ("bootstrap", "subsample", "none")
INTERVALS = ("conformal", "gaussian")
SUBSAMPLE_FRACTION = 0.8


def supports_std(estimator: Any) -> bool:
    """Whether ``estimator.predict`` takes ``return_std``."""
    try:
        return "return_std" in inspect.signature(estimator.predict).parameters
    except (TypeError, ValueError):
        return False


class EnsembleSurrogate(SurrogateBase):
    """Bootstrap/seed ensemble over ``estimator`` (default :class:`XGBSurrogate`).

    Parameters
    ----------
    estimator:
        Any surrogate of this package (cloned per member; ``random_state`` is reseeded if present).
    n_members:
        Number of members.
    resample:
        ``"bootstrap"``, ``"subsample"`` or ``"none"`` (see the module docstring).
    interval:
        ``"conformal"`` or ``"gaussian"``.
    random_state:
        Seed of the resampling and of the members' seeds.
    """

    def __init__(
        self,
        estimator: Any = None,
        n_members: int = 8,
        resample: str = "bootstrap",
        interval: str = "conformal",
        random_state: int = 0,
    ) -> None:
        self.estimator = estimator
        self.n_members = n_members
        self.resample = resample
        self.interval = interval
        self.random_state = random_state

    def _base(self) -> Any:
        return XGBSurrogate() if self.estimator is None else self.estimator

    def fit(self, X: Any, y: Any) -> EnsembleSurrogate:
        """Fit every member on its resample, then calibrate the intervals on out-of-bag rows."""
        if self.resample not in RESAMPLES:
            raise FeatureError(f"resample must be one of {', '.join(RESAMPLES)}, got {self.resample!r}")
        if self.interval not in INTERVALS:
            raise FeatureError(f"interval must be one of {', '.join(INTERVALS)}, got {self.interval!r}")
        if int(self.n_members) < 2:
            raise FeatureError(f"n_members must be at least 2, got {self.n_members}")
        oh, target = self._onehot_fit(X, y)
        n = oh.num_samples
        rng = np.random.default_rng(self.random_state)
        members = []
        in_bag = np.zeros((int(self.n_members), n), dtype=bool)
        for k in range(int(self.n_members)):
            if self.resample == "bootstrap":
                rows = rng.integers(0, n, size=n)
            elif self.resample == "subsample":
                rows = rng.choice(n, size=max(2, round(SUBSAMPLE_FRACTION * n)), replace=False)
            else:
                rows = np.arange(n)
            in_bag[k, rows] = True
            member = clone(self._base())
            if "random_state" in member.get_params(deep=False):
                member.set_params(random_state=int(rng.integers(0, 2**31 - 1)))
            member.fit(oh.matrix[rows], target[rows])
            members.append(member)
        self.members_ = members
        self.noise_var_ = 0.0
        means, member_var = self._member_predictions(oh.matrix)
        mean = means.mean(axis=0)
        spread = means.var(axis=0, ddof=1) + member_var
        oob = ~in_bag
        has_oob = oob.any(axis=0)
        if has_oob.any():
            counts = oob.sum(axis=0)
            oob_mean = np.where(oob, means, 0.0).sum(axis=0)[has_oob] / counts[has_oob]
            resid = target[has_oob] - oob_mean
        else:
            resid = target - mean
        if not supports_std(members[0]):
            excess = float(np.mean(resid**2) - np.mean(spread[has_oob] if has_oob.any() else spread))
            self.noise_var_ = max(excess, 1e-12)
        self.oob_fraction_ = float(has_oob.mean())
        if self.interval == "conformal" and has_oob.any():
            std = np.sqrt(spread[has_oob] + self.noise_var_)
            self.scores_ = np.sort(np.abs(resid) / np.maximum(std, 1e-12))
        else:
            self.scores_ = np.zeros(0)
        return self

    def _member_predictions(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members' means ``[K, P]`` and the mean of their own predictive variances ``[P]``."""
        if supports_std(self.members_[0]):
            outs = [m.predict(matrix, return_std=True) for m in self.members_]
            means = np.stack([o[0] for o in outs])
            var = np.mean(np.stack([o[1] for o in outs]) ** 2, axis=0)
            return means, var
        return np.stack([m.predict(matrix) for m in self.members_]), np.zeros(matrix.shape[0])

    def predict(self, X: Any, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Members' mean; with ``return_std`` also the predictive standard deviation."""
        matrix = self._onehot(X).matrix
        means, member_var = self._member_predictions(matrix)
        mean = means.mean(axis=0)
        if not return_std:
            return mean
        std = np.sqrt(means.var(axis=0, ddof=1) + member_var + self.noise_var_)
        return mean, std

    def quantile(self, level: float) -> float:
        """Multiplier ``q`` of the standard deviation for a central interval of coverage ``level``."""
        if not 0.0 < level < 1.0:
            raise FeatureError(f"interval level must be in (0, 1), got {level}")
        scores = self.scores_
        if scores.size == 0:
            return float(stats.norm.ppf(0.5 + level / 2.0))
        rank = int(np.ceil((scores.size + 1) * level)) - 1
        return float(scores[min(rank, scores.size - 1)])

    def predict_interval(self, X: Any, alpha: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the central ``1 - alpha`` predictive interval."""
        mean, std = self.predict(X, return_std=True)
        q = self.quantile(1.0 - alpha)
        return mean - q * std, mean + q * std

    # -- persistence --------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        from placement_search.surrogate.registry import estimator_to_json

        members = []
        files: dict[str, bytes] = {}
        for k, member in enumerate(self.members_):
            state, member_files = member.get_state()
            prefix = f"member_{k:03d}/"
            files.update({prefix + name: data for name, data in member_files.items()})
            members.append({"estimator": estimator_to_json(member), "state": state})
        return {
            **self._base_state(),
            "noise_var": self.noise_var_,
            "oob_fraction": self.oob_fraction_,
            "scores": self.scores_.tolist(),
            "members": members,
        }, files

    def set_state(self, state: dict[str, Any], files: dict[str, bytes]) -> None:
        from placement_search.surrogate.persistence import state_array, state_float
        from placement_search.surrogate.registry import estimator_from_json

        self._set_base_state(state)
        self.noise_var_ = state_float(state, "noise_var")
        self.oob_fraction_ = state_float(state, "oob_fraction")
        self.scores_ = state_array(state, "scores", None)
        entries = state["members"]
        if not isinstance(entries, list) or len(entries) < 2:
            raise FeatureError("state: 'members' must be a list of at least two members")
        members = []
        for k, entry in enumerate(entries):
            prefix = f"member_{k:03d}/"
            member = estimator_from_json(entry["estimator"], f"members[{k}].estimator")
            sub = {name[len(prefix) :]: data for name, data in files.items() if name.startswith(prefix)}
            member.set_state(entry["state"], sub)
            members.append(member)
        self.members_ = members

