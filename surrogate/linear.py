"""Linear surrogates with a Gaussian prior: the per-layer model, and the solver the cluster expansion shares.

:class:`LinearSurrogate` is ridge regression on the one-hot placement (one weight per layer and
mixer, optionally plus mixer counts). Two priors:

* ``prior="ridge"`` — fixed penalty ``alpha`` (closed form). The noise variance is estimated from
  the residuals with the effective degrees of freedom, and the posterior covariance of the weights
  is ``sigma^2 (X'X + alpha I)^-1``;
* ``prior="bayesian"`` — :class:`sklearn.linear_model.BayesianRidge` learns the prior and noise
  precisions by evidence maximisation.

Either way ``predict(X, return_std=True)`` returns the posterior predictive standard deviation
``sqrt(sigma^2 + sigma^2/n + (x - xbar)' Sigma (x - xbar))`` with the weights' posterior covariance
``Sigma = c · (g · Xc'Xc + diag(p))^-1`` (ridge: ``c = sigma^2, g = 1, p = alpha (+1e-10)``;
Bayesian: ``c = 1, g = alpha_, p = lambda_``, i.e. noise and weight precisions), and

Saving (:func:`fit_state`) offers four forms of ``Sigma`` (``covariance=``):

* ``"design"`` (default) — the training rows as mixer indices (int8, ``P x N``) plus ``c, g, p``;
  ``Sigma`` is rebuilt from them the first time a loaded model is asked for ``return_std``. Exact
  (the same arithmetic as the fit, so the same bits) and tiny (~70 KB for 1440 rows of 48 layers,
  where the dense ``Sigma`` of a 2448-column cluster expansion is 48 MB); the rebuild costs one
  ``d x d`` Cholesky inverse (about a second for ``d = 2448``);
* ``"float32"`` — dense, single precision (half the size of float64; std relative error ~1e-6);
* ``"float64"`` — dense, as fitted;
* ``"none"`` — no covariance: the loaded model predicts, but ``return_std`` raises.
 ``unary_`` ([N, M]) and
``intercept_`` give the fitted model in a canonical (gauge-fixed) form: every layer's row of
``unary_`` has mean zero over the mixers, count weights are folded into it, so that
``prediction = intercept_ + sum_l unary_[l, x_l]`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import linalg
from sklearn.linear_model import BayesianRidge

from placement_search.surrogate.base import SurrogateBase
from placement_search.surrogate.features import FeatureError, OneHot, count_features

PRIORS = ("ridge", "bayesian")
#: Forms of the posterior covariance on disk (see the module docstring).
COVARIANCE_FORMS = ("design", "float32", "float64", "none")


def posterior_covariance(
    design: np.ndarray, x_mean: np.ndarray, scale: float, data_precision: float, prior_precision: np.ndarray
) -> np.ndarray:
    """``scale · (data_precision · Xc'Xc + diag(prior_precision))^-1`` with ``Xc = design - x_mean``.

    With fewer rows than columns it goes through the ``P x P`` system (Woodbury identity), which is
    cheaper and exact; fits and loads both call this function, so they get the same bits.
    """
    xc = design - x_mean
    n, d = xc.shape
    if n < d:
        pinv = 1.0 / prior_precision
        b = xc * pinv
        m = np.eye(n) / data_precision + b @ xc.T
        try:
            inner = linalg.cho_solve(linalg.cho_factor(m, lower=True, check_finite=False), b, check_finite=False)
        except linalg.LinAlgError:
            inner = linalg.pinvh(m) @ b
        inv = np.diag(pinv) - b.T @ inner
        return scale * inv
    a = data_precision * (xc.T @ xc) + np.diag(prior_precision)
    try:
        factor = linalg.cho_factor(a, lower=True, check_finite=False)
        inv = linalg.cho_solve(factor, np.eye(d), check_finite=False)
    except linalg.LinAlgError:
        inv = linalg.pinvh(a)
    return scale * inv


@dataclass
class LinearFit:
    """A fitted Gaussian linear model: ``y = intercept + X @ coef + noise``.

    ``covariance`` is the weights' posterior covariance ``scale · (data_precision · Xc'Xc +
    diag(prior_precision))^-1``; after loading a ``"design"``-form save it is ``None`` until
    ``training_design`` (a callable returning the training design matrix) rebuilds it.
    """

    coef: np.ndarray
    intercept: float
    x_mean: np.ndarray
    noise_var: float
    n_samples: int
    covariance: np.ndarray | None
    scale: float = 1.0
    data_precision: float = 1.0
    prior_precision: np.ndarray | None = None
    training_design: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def predict(self, design: np.ndarray) -> np.ndarray:
        return design @ self.coef + self.intercept

    def posterior(self) -> np.ndarray:
        """The weights' posterior covariance (rebuilt from the training design on first use if need be)."""
        if self.covariance is None and self.training_design is not None and self.prior_precision is not None:
            self.covariance = posterior_covariance(
                self.training_design(), self.x_mean, self.scale, self.data_precision, self.prior_precision
            )
        if self.covariance is None:
            raise FeatureError("this model was saved without its posterior covariance; return_std is unavailable")
        return self.covariance

    def predict_std(self, design: np.ndarray) -> np.ndarray:
        """Posterior predictive standard deviation (noise + intercept + weight uncertainty)."""
        centered = design - self.x_mean
        var = np.einsum("ij,ij->i", centered @ self.posterior(), centered)
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
        # Sigma = (alpha_ Xc'Xc + lambda_ I)^-1, computed here rather than taken from sklearn's
        # sigma_ (which, when P < d, drops the directions the data do not reach) so that a model
        # rebuilt from its training design (covariance="design") gives the same bits.
        # The covariance is built on the first return_std (validation and search need only means).
        prior_precision = np.full(d, float(model.lambda_))
        return LinearFit(
            coef,
            intercept,
            x_mean,
            float(1.0 / model.alpha_),
            n,
            None,
            1.0,
            float(model.alpha_),
            prior_precision,
            training_design=lambda: design,
        )
    pen = np.broadcast_to(np.asarray(penalty, dtype=np.float64), (d,))
    if np.any(pen < 0) or not np.all(np.isfinite(pen)):
        raise FeatureError("ridge penalty must be finite and non-negative")
    prior_precision = pen + 1e-10
    xc = design - x_mean
    gram = xc.T @ xc
    a_inv = posterior_covariance(design, x_mean, 1.0, 1.0, prior_precision)
    coef = a_inv @ (xc.T @ (y - y_mean))
    intercept = y_mean - float(x_mean @ coef)
    resid = y - (design @ coef + intercept)
    dof = float(np.sum(a_inv * gram))
    noise_var = float(resid @ resid) / max(n - 1 - dof, 1.0)
    noise_var = max(noise_var, 1e-12)
    cov = noise_var * a_inv  # == posterior_covariance(design, x_mean, noise_var, 1.0, prior_precision)
    return LinearFit(coef, intercept, x_mean, noise_var, n, cov, noise_var, 1.0, prior_precision)


def fit_state(
    fit: LinearFit, covariance: str = "design", training_indices: np.ndarray | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """JSON state and binary files (safetensors) of a :class:`LinearFit`.

    ``covariance`` is one of :data:`COVARIANCE_FORMS`; ``"design"`` needs ``training_indices``
    (the training rows' mixer indices, ``[P, N]``) and falls back to ``"float32"`` without them
    (e.g. for a model that was itself loaded from a dense save).
    """
    from placement_search.surrogate.persistence import array_to_bytes

    if covariance not in COVARIANCE_FORMS:
        raise FeatureError(f"covariance must be one of {', '.join(COVARIANCE_FORMS)}, got {covariance!r}")
    form = covariance
    if form == "design" and (training_indices is None or fit.prior_precision is None):
        form = "float32"
    if form in ("float32", "float64") and fit.covariance is None and fit.training_design is None:
        form = "none"
    state: dict[str, Any] = {
        "coef": fit.coef.tolist(),
        "intercept": fit.intercept,
        "x_mean": fit.x_mean.tolist(),
        "noise_var": fit.noise_var,
        "n_samples": fit.n_samples,
        "covariance_form": form,
        "covariance_file": None,
    }
    files: dict[str, bytes] = {}
    if form == "design":
        assert training_indices is not None and fit.prior_precision is not None
        state.update(
            scale=fit.scale,
            data_precision=fit.data_precision,
            prior_precision=fit.prior_precision.tolist(),
            covariance_file="training_indices.safetensors",
        )
        files["training_indices.safetensors"] = array_to_bytes(np.asarray(training_indices, dtype=np.int8))
    elif form in ("float32", "float64"):
        dtype = np.float32 if form == "float32" else np.float64
        state["covariance_file"] = "covariance.safetensors"
        files["covariance.safetensors"] = array_to_bytes(fit.posterior().astype(dtype))
    return state, files


def fit_from_state(
    state: dict[str, Any],
    files: dict[str, bytes],
    num_features: int,
    design_from_indices: Callable[[np.ndarray], np.ndarray] | None = None,
    num_layers: int | None = None,
    num_mixers: int | None = None,
) -> tuple[LinearFit, np.ndarray | None]:
    """Inverse of :func:`fit_state`; checks every array's shape. Returns the fit and the training
    indices (``"design"`` form) or ``None``. ``design_from_indices`` turns indices into the design."""
    from placement_search.surrogate.persistence import bytes_to_array, state_array, state_float

    coef = state_array(state, "coef", (num_features,))
    x_mean = state_array(state, "x_mean", (num_features,))
    n = int(state_float(state, "n_samples"))
    fit = LinearFit(coef, state_float(state, "intercept"), x_mean, state_float(state, "noise_var"), n, None)
    name = state.get("covariance_file")
    form = state.get("covariance_form", "float64" if name else "none")
    if form not in COVARIANCE_FORMS:
        raise FeatureError(f"state: key 'covariance_form' is {form!r}, expected one of {', '.join(COVARIANCE_FORMS)}")
    if form == "none":
        return fit, None
    if not name or name not in files:
        raise FeatureError(f"state: covariance file {name!r} is missing")
    if form in ("float32", "float64"):
        fit.covariance = bytes_to_array(files[name], name, (num_features, num_features))
        return fit, None
    if design_from_indices is None or num_layers is None or num_mixers is None:
        raise FeatureError("state: a 'design' covariance needs the model to rebuild its design")
    indices = bytes_to_array(files[name], name, (n, num_layers), dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= num_mixers):
        raise FeatureError(f"{name}: mixer indices outside 0..{num_mixers - 1}")
    fit.scale = state_float(state, "scale")
    fit.data_precision = state_float(state, "data_precision")
    fit.prior_precision = state_array(state, "prior_precision", (num_features,))
    fit.training_design = lambda: design_from_indices(indices)
    return fit, indices


def indices_to_onehot(indices: np.ndarray, num_mixers: int) -> OneHot:
    """The :class:`OneHot` of mixer indices ``[P, N]`` (no search space)."""
    p, n = indices.shape
    matrix = np.zeros((p, n * num_mixers))
    matrix[np.arange(p)[:, None], np.arange(n)[None, :] * num_mixers + indices] = 1.0
    return OneHot(matrix, n, num_mixers)


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
        self.training_indices_ = oh.indices().astype(np.int8)
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

    def get_state(self, covariance: str = "design") -> tuple[dict[str, Any], dict[str, bytes]]:
        state, files = fit_state(self.fit_, covariance, getattr(self, "training_indices_", None))
        return {**self._base_state(), "fit": state}, files

    def set_state(self, state: dict[str, Any], files: dict[str, bytes]) -> None:
        self._set_base_state(state)
        width = self.num_layers_ * self.num_mixers_ + (self.num_mixers_ if self.include_counts else 0)
        self.fit_, self.training_indices_ = fit_from_state(
            state["fit"],
            files,
            width,
            lambda idx: self._design(indices_to_onehot(idx, self.num_mixers_)),
            self.num_layers_,
            self.num_mixers_,
        )
        self._finish()
