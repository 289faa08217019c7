"""Linear surrogates with a Gaussian prior: the per-layer model, and the solver the cluster expansion shares.

:class:`LinearSurrogate` is ridge regression on the one-hot placement (one weight per layer and
mixer, optionally plus mixer counts). Two priors:

* ``prior="ridge"`` — fixed penalty ``alpha`` (closed form). The noise variance is estimated from
  the residuals with the effective degrees of freedom, and the posterior covariance of the weights
  is ``sigma^2 (X'X + alpha I)^-1``;
* ``prior="bayesian"`` — :class:`sklearn.linear_model.BayesianRidge` learns the prior and noise
  precisions by evidence maximisation.

Either way ``predict(X, return_std=True)`` returns the posterior predictive standard deviation
``sqrt(sigma^2 + sigma^2/n + (x - xbar)' Sigma (x - xbar))``, and ``unary_`` ([N, M]) and
``intercept_`` give the fitted model in a canonical (gauge-fixed) form: every layer's row of
``unary_`` has mean zero over the mixers, count weights are folded into it, so that
``prediction = intercept_ + sum_l unary_[l, x_l]`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import linalg
from sklearn.linear_model import BayesianRidge

from placement_search.surrogate.base import SurrogateBase
from placement_search.surrogate.features import FeatureError, OneHot, count_features

PRIORS = ("ridge", "bayesian")


@dataclass
class LinearFit:
    """A fitted Gaussian linear model: ``y = intercept + X @ coef + noise``."""

    coef: np.ndarray
    intercept: float
    x_mean: np.ndarray
    noise_var: float
    n_samples: int
    covariance: np.ndarray | None

    def predict(self, design: np.ndarray) -> np.ndarray:
        return design @ self.coef + self.intercept

    def predict_std(self, design: np.ndarray) -> np.ndarray:
        """Posterior predictive standard deviation (noise + intercept + weight uncertainty)."""
        if self.covariance is None:
            raise FeatureError("this model was saved without its posterior covariance; return_std is unavailable")
        centered = design - self.x_mean
        var = np.einsum("ij,jk,ik->i", centered, self.covariance, centered, optimize=True)
        return np.sqrt(np.maximum(var, 0.0) + self.noise_var * (1.0 + 1.0 / self.n_samples))


def fit_gaussian_linear(design: np.ndarray, y: np.ndarray, prior: str, penalty: np.ndarray | float) -> LinearFit:
    """Fit ``y ~ design`` with a ridge prior (``penalty`` per column, or one value) or Bayesian ridge.

    The intercept is not penalised. For ``prior="bayesian"`` ``penalty`` is ignored.
    """
    if prior not in PRIORS:
        raise FeatureError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    n, d = design.shape
    x_mean = design.mean(axis=0)
    y_mean = float(y.mean())
    if prior == "bayesian":
        model = BayesianRidge(fit_intercept=True, max_iter=300, tol=1e-6)
        model.fit(design, y)
        coef = np.asarray(model.coef_, dtype=np.float64)
        intercept = float(model.intercept_)
        return LinearFit(coef, intercept, x_mean, float(1.0 / model.alpha_), n, np.asarray(model.sigma_))
    pen = np.broadcast_to(np.asarray(penalty, dtype=np.float64), (d,))
    if np.any(pen < 0) or not np.all(np.isfinite(pen)):
        raise FeatureError("ridge penalty must be finite and non-negative")
    xc = design - x_mean
    gram = xc.T @ xc
    a = gram + np.diag(pen) + 1e-10 * np.eye(d)
    try:
        factor = linalg.cho_factor(a, lower=True, check_finite=False)
        coef = linalg.cho_solve(factor, xc.T @ (y - y_mean), check_finite=False)
        a_inv = linalg.cho_solve(factor, np.eye(d), check_finite=False)
    except linalg.LinAlgError:
        a_inv = linalg.pinvh(a)
        coef = a_inv @ (xc.T @ (y - y_mean))
    intercept = y_mean - float(x_mean @ coef)
    resid = y - (design @ coef + intercept)
    dof = float(np.sum(a_inv * gram))
    noise_var = float(resid @ resid) / max(n - 1 - dof, 1.0)
    noise_var = max(noise_var, 1e-12)
    return LinearFit(coef, intercept, x_mean, noise_var, n, noise_var * a_inv)


def fit_state(fit: LinearFit, include_covariance: bool = True) -> tuple[dict[str, Any], dict[str, bytes]]:
    """JSON state and binary files (the covariance as safetensors) of a :class:`LinearFit`."""
    from placement_search.surrogate.persistence import array_to_bytes

    state = {
        "coef": fit.coef.tolist(),
        "intercept": fit.intercept,
        "x_mean": fit.x_mean.tolist(),
        "noise_var": fit.noise_var,
        "n_samples": fit.n_samples,
        "covariance_file": "covariance.safetensors" if include_covariance and fit.covariance is not None else None,
    }
    files = {"covariance.safetensors": array_to_bytes(fit.covariance)} if state["covariance_file"] else {}
    return state, files


def fit_from_state(state: dict[str, Any], files: dict[str, bytes], num_features: int) -> LinearFit:
    """Inverse of :func:`fit_state`; checks every array's length against ``num_features``."""
    from placement_search.surrogate.persistence import bytes_to_array, state_array, state_float

    coef = state_array(state, "coef", (num_features,))
    x_mean = state_array(state, "x_mean", (num_features,))
    cov = None
    name = state.get("covariance_file")
    if name:
        if name not in files:
            raise FeatureError(f"state: covariance file {name!r} is missing")
        cov = bytes_to_array(files[name], name, (num_features, num_features))
    n = int(state_float(state, "n_samples"))
    return LinearFit(coef, state_float(state, "intercept"), x_mean, state_float(state, "noise_var"), n, cov)


class LinearSurrogate(SurrogateBase):
    """Per-layer linear model (ridge on the one-hot), with posterior uncertainty.

    Parameters
    ----------
    alpha:
        Ridge penalty for ``prior="ridge"``.
    prior:
        ``"ridge"`` (fixed ``alpha``) or ``"bayesian"`` (:class:`~sklearn.linear_model.BayesianRidge`).
    include_counts:
        Add the layers-per-mixer counts as ``M`` extra features (they share strength across layers).

    Fitted attributes: ``unary_`` ``[N, M]``, ``intercept_`` (canonical form, see the module
    docstring), ``coef_`` (raw weights over the design columns), ``noise_std_``.
    """

    def __init__(self, alpha: float = 1.0, prior: str = "ridge", include_counts: bool = False) -> None:
        self.alpha = alpha
        self.prior = prior
        self.include_counts = include_counts

    def _design(self, oh: OneHot) -> np.ndarray:
        parts = [oh.matrix]
        if self.include_counts:
            parts.append(count_features(oh))
        return np.hstack(parts) if len(parts) > 1 else oh.matrix

    def fit(self, X: Any, y: Any) -> LinearSurrogate:
        """Fit on placements (or one-hot rows) ``X`` and targets ``y``."""
        oh, target = self._onehot_fit(X, y)
        self.fit_ = fit_gaussian_linear(self._design(oh), target, self.prior, float(self.alpha))
        self._finish()
        return self

    def _finish(self) -> None:
        n, m = self.num_layers_, self.num_mixers_
        coef = self.fit_.coef
        unary = coef[: n * m].reshape(n, m).copy()
        if self.include_counts:
            unary += coef[n * m : n * m + m][None, :]
        means = unary.mean(axis=1, keepdims=True)
        self.unary_ = unary - means
        self.intercept_ = float(self.fit_.intercept + means.sum())
        self.coef_ = coef
        self.noise_std_ = float(np.sqrt(self.fit_.noise_var))

    def predict(self, X: Any, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predicted quality; with ``return_std`` also the posterior predictive standard deviation."""
        design = self._design(self._onehot(X))
        mean = self.fit_.predict(design)
        if return_std:
            return mean, self.fit_.predict_std(design)
        return mean

    def get_state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        state, files = fit_state(self.fit_)
        return {**self._base_state(), "fit": state}, files

    def set_state(self, state: dict[str, Any], files: dict[str, bytes]) -> None:
        self._set_base_state(state)
        width = self.num_layers_ * self.num_mixers_ + (self.num_mixers_ if self.include_counts else 0)
        self.fit_ = fit_from_state(state["fit"], files, width)
        self._finish()
