"""Surrogates: learn placement quality from evaluated placements, and know how well.

Estimators (scikit-learn interface; ``X`` is a list of placements or the one-hot ``[P, N*M]`` array):

* :class:`XGBSurrogate` — gradient-boosted trees on the one-hot (the default surrogate);
* :class:`LinearSurrogate` — per-layer ridge / Bayesian ridge, with posterior std;
* :class:`ClusterExpansion` — per-layer plus short-range pair terms (``unary_``, ``pair_[d]``, ``intercept_``);
* :class:`EnsembleSurrogate` — bootstrap/seed ensemble over any of them, with calibrated intervals.

Validation in :mod:`.validation`, Optuna tuning in :mod:`.tuning`, pickle-free saving in
:mod:`.persistence`, evaluation tables in :mod:`.table`, known-answer test functions in :mod:`.datasets`.

The names below are imported on first access (PEP 562), so importing a light submodule such as
:mod:`.registry` does not load xgboost and scikit-learn.
"""

from __future__ import annotations

from placement_search._lazy import lazy_exports

_EXPORTS = {
    "ClusterExpansion": "cluster",
    "EnsembleSurrogate": "ensemble",
    "LinearSurrogate": "linear",
    "XGBSurrogate": "xgb",
    "load_surrogate": "persistence",
    "save_surrogate": "persistence",
    "SURROGATE_NAMES": "registry",
    "make_surrogate": "registry",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
