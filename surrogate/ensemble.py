"""Ensembles over any surrogate: uncertainty for models that have none (and better for those that do).

:class:`EnsembleSurrogate` fits ``n_members`` clones of a base estimator, each on a bootstrap
resample (``resample="bootstrap"``), a subsample without replacement (``"subsample"``, 80%), the
complement of one of ``n_members`` folds (``"kfold"``: every row is left out by exactly one member),
or all rows with a different seed (``"none"``). Its prediction ``mu(x)`` is the members' mean —
except with ``"kfold"``, where one more clone is fitted on all rows (``final_``) and predicts, with
its own standard deviation, while the fold members only calibrate (a cross-conformal scheme).

Why ``"kfold"`` for bases with their own posterior (``ensemble-cluster``): a cluster expansion has
~2400 weights, so a bootstrap member (63% distinct rows) is much worse than a fit on all rows, and
the mean of fold members is much better than any one of them; residuals of out-of-bag members then
overstate the error of the mean (over-coverage). Normalised by each model's *own* posterior std, a
fold member's out-of-fold residuals are distributed like the full fit's errors on new points, so
their quantile transfers to ``final_``.

Its standard deviation ``s(x)`` depends on the base:

* bases with ``predict(X, return_std=True)`` (the linear and cluster models):
  ``s(x)^2 = mean_k v_k(x)``, the mean of the members' own posterior predictive variances (they
  already hold the weight uncertainty; adding the members' spread would count it twice); with
  ``"kfold"``, ``final_``'s own ``v(x)``;
* other bases (XGBoost): ``s(x)^2 = sigma^2 + tau^2(x) / K`` with ``tau^2(x)`` the variance of the
  ``K`` members' predictions and ``sigma^2`` (``noise_var_``) the part of the out-of-bag squared
  error the spread does not explain (noise plus bias). With ``resample="kfold"`` each row has one
  out-of-bag member, so no spread can be measured there and ``s(x)^2 = sigma^2`` is a constant
  (``final_``, fitted on more rows than the members, is then a little more accurate than the
  intervals assume: they err on the wide side).

``predict_interval(X, alpha)`` gives the central ``1 - alpha`` interval ``mu ± q·s``. With
``interval="conformal"`` (default) ``q`` is the finite-sample-corrected quantile of out-of-bag
normalised residuals ``|y_i - mu_oob(x_i)| / s_oob(x_i)``, where — and this matters —
``mu_oob`` and ``s_oob`` are computed from the *out-of-bag members only*, with the same formula
as at prediction time (``K`` replaced by the number ``m_i`` of out-of-bag members of row ``i``).
Members that saw row ``i`` predict it too well and shrink or distort ``s`` there; mixing them into
the normaliser (as earlier versions did) made the scores' distribution differ from that of new
points, so one ``q`` could not be right at every level (ensemble-cluster covered 69% at 50% and
90% at 95%). Rows with too few out-of-bag members (none; or one when the spread is used) are
skipped. With ``"gaussian"``, or when no row is usable (``resample="none"``), ``q`` is the normal
quantile.

The conformal rule calibrates on data like the training data. Placements from a different
sampler (out of distribution) can have larger errors than ``s`` admits; then
:meth:`EnsembleSurrogate.calibrate_inflation` fits one multiplier of ``q`` (``inflation_``, at
least 1) on a held-out sample of such placements (see :mod:`.validation` for the measured effect).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn.base import clone

from placement_search.surrogate.base import SurrogateBase, as_target
from placement_search.surrogate.features import FeatureError
from placement_search.surrogate.xgb import XGBSurrogate

RESAMPLES = ("bootstrap", "subsample", "kfold", "none")
INTERVALS = ("conformal", "gaussian")
SUBSAMPLE_FRACTION = 0.8
DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95)


def supports_std(estimator: Any) -> bool:
    """Whether ``estimator.predict`` takes ``return_std``."""
    try:
        return "return_std" in inspect.signature(estimator.predict).parameters
    except (TypeError, ValueError):
        return False


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ``ceil((n+1)·level)``-th smallest of sorted ``scores`` (the last one if that is past the end)."""
    rank = int(np.ceil((scores.size + 1) * level)) - 1
    return float(scores[min(max(rank, 0), scores.size - 1)])


class EnsembleSurrogate(SurrogateBase):
    """Bootstrap/fold/seed ensemble over ``estimator`` (default :class:`XGBSurrogate`).

    Parameters
    ----------
    estimator:
        Any surrogate of this package (cloned per member; ``random_state`` is reseeded if present).
    n_members:
        Number of members (for ``resample="kfold"`` also the number of folds).
    resample:
        ``"bootstrap"``, ``"subsample"``, ``"kfold"`` or ``"none"`` (see the module docstring).
    interval:
        ``"conformal"`` or ``"gaussian"``.
    random_state:
        Seed of the resampling and of the members' seeds.

    Fitted attributes: ``members_``, ``noise_var_`` (``sigma^2``; 0 for bases with their own std),
    ``scores_`` (sorted conformal scores), ``oob_fraction_`` (share of rows that gave a score),
    ``inflation_`` (multiplier of ``q``; 1 unless :meth:`calibrate_inflation` was called).
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

    def _uses_spread(self) -> bool:
        """Whether ``s(x)`` holds the members' spread (bases without std, unless each row has one OOB member)."""
        return not self.base_has_std_ and self.resample != "kfold"

    def _bags(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        k = int(self.n_members)
        if self.resample == "bootstrap":
            return [rng.integers(0, n, size=n) for _ in range(k)]
        if self.resample == "subsample":
            size = min(n - 1, max(2, round(SUBSAMPLE_FRACTION * n)))
            return [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(k)]
        if self.resample == "kfold":
            if n < 2 * k:
                raise FeatureError(f"resample='kfold' with {k} members needs at least {2 * k} rows, got {n}")
            folds = np.array_split(rng.permutation(n), k)
            return [np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i])) for i in range(k)]
        return [np.arange(n) for _ in range(k)]

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
        for k, rows in enumerate(self._bags(n, rng)):
            in_bag[k, rows] = True
            member = clone(self._base())
            if "random_state" in member.get_params(deep=False):
                member.set_params(random_state=int(rng.integers(0, 2**31 - 1)))
            member.fit(oh.matrix[rows], target[rows])
            members.append(member)
        self.members_ = members
        self.base_has_std_ = supports_std(members[0])
        self.final_ = None
        if self.resample == "kfold":
            final = clone(self._base())
            if "random_state" in final.get_params(deep=False):
                final.set_params(random_state=int(rng.integers(0, 2**31 - 1)))
            self.final_ = final.fit(oh.matrix, target)
        self.inflation_ = 1.0
        self.noise_var_ = 0.0
        means, member_var = self._member_predictions(oh.matrix)
        oob = ~in_bag
        counts = oob.sum(axis=0)
        spread = self._uses_spread()
        usable = counts >= (2 if spread else 1)
        self.oob_fraction_ = float(usable.mean())
        if not usable.any():
            # No out-of-bag rows: in-sample residuals stand in for sigma^2, intervals are Gaussian.
            if not self.base_has_std_:
                resid = target - means.mean(axis=0)
                tau2 = means.var(axis=0, ddof=1) / means.shape[0]
                self.noise_var_ = max(float(np.mean(resid**2 - tau2)), 1e-12)
            self.scores_ = np.zeros(0)
            return self
        w = oob[:, usable].astype(np.float64)
        m = counts[usable].astype(np.float64)
        oob_mean = (w * means[:, usable]).sum(axis=0) / m
        resid = target[usable] - oob_mean
        if self.base_has_std_:
            scale2 = (w * member_var[:, usable]).sum(axis=0) / m
        else:
            tau2 = np.zeros(m.size)
            if spread:
                tau2 = (w * (means[:, usable] - oob_mean) ** 2).sum(axis=0) / (m - 1.0) / m
            self.noise_var_ = max(float(np.mean(resid**2 - tau2)), 1e-12)
            scale2 = tau2 + self.noise_var_
        if self.interval == "conformal":
            self.scores_ = np.sort(np.abs(resid) / np.sqrt(np.maximum(scale2, 1e-24)))
        else:
            self.scores_ = np.zeros(0)
        return self

    def _member_predictions(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Members' means ``[K, P]`` and their own predictive variances ``[K, P]`` (None without std)."""
        if supports_std(self.members_[0]):
            outs = [m.predict(matrix, return_std=True) for m in self.members_]
            return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs]) ** 2
        return np.stack([m.predict(matrix) for m in self.members_]), None

    def predict(self, X: Any, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Members' mean; with ``return_std`` also ``s(x)`` (see the module docstring)."""
        matrix = self._onehot(X).matrix
        final = getattr(self, "final_", None)
        if final is not None:
            if self.base_has_std_:
                return final.predict(matrix, return_std=return_std)
            mean = final.predict(matrix)
            return (mean, np.full(mean.shape, np.sqrt(self.noise_var_))) if return_std else mean
        if not return_std:
            return np.mean([m.predict(matrix) for m in self.members_], axis=0)
        means, member_var = self._member_predictions(matrix)
        mean = means.mean(axis=0)
        if member_var is not None:
            return mean, np.sqrt(member_var.mean(axis=0))
        var = np.full(mean.shape, self.noise_var_)
        if self._uses_spread():
            var += means.var(axis=0, ddof=1) / means.shape[0]
        return mean, np.sqrt(var)

    def quantile(self, level: float) -> float:
        """Multiplier ``q`` of ``s(x)`` for a central interval of coverage ``level`` (times ``inflation_``)."""
        return self._raw_quantile(level) * float(getattr(self, "inflation_", 1.0))

    def _raw_quantile(self, level: float) -> float:
        if not 0.0 < level < 1.0:
            raise FeatureError(f"interval level must be in (0, 1), got {level}")
        if self.scores_.size == 0:
            return float(stats.norm.ppf(0.5 + level / 2.0))
        return conformal_quantile(self.scores_, level)

    def predict_interval(self, X: Any, alpha: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the central ``1 - alpha`` predictive interval."""
        mean, std = self.predict(X, return_std=True)
        q = self.quantile(1.0 - alpha)
        return mean - q * std, mean + q * std

    def calibrate_inflation(self, X: Any, y: Any, levels: Sequence[float] = DEFAULT_LEVELS) -> float:
        """Fit ``inflation_`` on a held-out sample ``X, y`` (placements the model was not fitted on).

        For each level, the held-out normalised residuals ``|y - mu| / s`` give the ``q`` that would
        have covered that sample (finite-sample corrected); ``inflation_`` is the largest ratio of
        that ``q`` to the out-of-bag ``q``, and never below 1 (the option only widens). Use a sample
        from the distribution the intervals are for (e.g. the structured or stratified sampler), not
        rows the model was trained on. Returns the factor.
        """
        mean, std = self.predict(X, return_std=True)
        target = as_target(y, mean.shape[0])
        held = np.sort(np.abs(target - mean) / np.maximum(std, 1e-12))
        ratios = [conformal_quantile(held, float(lv)) / self._raw_quantile(float(lv)) for lv in levels]
        self.inflation_ = max(1.0, float(max(ratios)))
        return self.inflation_

    # -- persistence --------------------------------------------------------------------------

    def get_state(self, covariance: str = "design") -> tuple[dict[str, Any], dict[str, bytes]]:
        """State and files. ``covariance`` is passed to the members whose std the ensemble's is made
        of; with ``final_`` (``resample="kfold"``) only ``final_`` needs one, so the members store none."""
        from placement_search.surrogate.registry import estimator_to_json

        members = []
        files: dict[str, bytes] = {}
        member_covariance = "none" if getattr(self, "final_", None) is not None else covariance
        for k, member in enumerate(self.members_):
            state, member_files = member.get_state(covariance=member_covariance)
            prefix = f"member_{k:03d}/"
            files.update({prefix + name: data for name, data in member_files.items()})
            members.append({"estimator": estimator_to_json(member), "state": state})
        final = None
        if getattr(self, "final_", None) is not None:
            state, final_files = self.final_.get_state(covariance=covariance)
            files.update({"final/" + name: data for name, data in final_files.items()})
            final = {"estimator": estimator_to_json(self.final_), "state": state}
        return {
            **self._base_state(),
            "noise_var": self.noise_var_,
            "oob_fraction": self.oob_fraction_,
            "inflation": self.inflation_,
            "scores": self.scores_.tolist(),
            "members": members,
            "final": final,
        }, files

    def set_state(self, state: dict[str, Any], files: dict[str, bytes]) -> None:
        from placement_search.surrogate.persistence import state_array, state_float
        from placement_search.surrogate.registry import estimator_from_json

        self._set_base_state(state)
        self.noise_var_ = state_float(state, "noise_var")
        self.oob_fraction_ = state_float(state, "oob_fraction")
        self.inflation_ = state_float(state, "inflation") if "inflation" in state else 1.0
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
        self.base_has_std_ = supports_std(members[0])
        self.final_ = None
        entry = state.get("final")
        if entry is not None:
            final = estimator_from_json(entry["estimator"], "final.estimator")
            final.set_state(entry["state"], {n[len("final/") :]: d for n, d in files.items() if n.startswith("final/")})
            self.final_ = final

