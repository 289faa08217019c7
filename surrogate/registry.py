"""Surrogates by name (for the CLI and benchmarks) and estimator <-> JSON (class name + params).

:func:`make_surrogate` builds the named configurations listed in :data:`SURROGATE_NAMES`;
:func:`estimator_to_json` / :func:`estimator_from_json` turn an (unfitted) estimator's class and
parameters into JSON and back, only ever instantiating the classes of :func:`surrogate_classes`.
Importing this module is cheap (the CLI's parser uses :data:`SURROGATE_NAMES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from placement_search.errors import PlacementSearchError


def surrogate_classes() -> dict[str, type]:
    """The classes persistence may instantiate, by name (imported on first use: xgboost is slow to load)."""
    from placement_search.surrogate.cluster import ClusterExpansion
    from placement_search.surrogate.ensemble import EnsembleSurrogate
    from placement_search.surrogate.linear import LinearSurrogate
    from placement_search.surrogate.xgb import XGBSurrogate

    return {cls.__name__: cls for cls in (XGBSurrogate, LinearSurrogate, ClusterExpansion, EnsembleSurrogate)}


def _new(name: str, **params: Any) -> Any:
    return surrogate_classes()[name](**params)


_FACTORIES: dict[str, Callable[[int], Any]] = {
    "xgb": lambda seed: _new("XGBSurrogate", random_state=seed),
    "xgb-counts": lambda seed: _new("XGBSurrogate", include_counts=True, random_state=seed),
    "ridge": lambda seed: _new("LinearSurrogate", prior="ridge"),
    "bayes-ridge": lambda seed: _new("LinearSurrogate", prior="bayesian"),
    "cluster": lambda seed: _new("ClusterExpansion", prior="bayesian"),
    "cluster-ridge": lambda seed: _new("ClusterExpansion", prior="ridge", alpha=1.0, pair_alpha=4.0),
    "ensemble-xgb": lambda seed: _new("EnsembleSurrogate", estimator=_new("XGBSurrogate"), random_state=seed),
    "ensemble-xgb-counts": lambda seed: _new(
        "EnsembleSurrogate", estimator=_new("XGBSurrogate", include_counts=True), random_state=seed
    ),
    "ensemble-ridge": lambda seed: _new(
        "EnsembleSurrogate", estimator=_new("LinearSurrogate", prior="ridge"), random_state=seed
    ),
    "ensemble-cluster": lambda seed: _new(
        "EnsembleSurrogate",
        estimator=_new("ClusterExpansion", prior="ridge", pair_alpha=4.0),
        n_members=5,
        resample="kfold",
        random_state=seed,
    ),
}

#: Names accepted by :func:`make_surrogate` (and ``placement-search fit --surrogate``).
SURROGATE_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_surrogate(name: str, seed: int = 0) -> Any:
    """A fresh, unfitted surrogate of the named configuration."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise PlacementSearchError(f"unknown surrogate {name!r}; valid: {', '.join(SURROGATE_NAMES)}") from None
    return factory(int(seed))


def estimator_to_json(estimator: Any) -> dict[str, Any]:
    """``{"class": name, "params": {...}}``; nested estimators are written the same way."""
    name = type(estimator).__name__
    classes = surrogate_classes()
    if classes.get(name) is not type(estimator):
        raise PlacementSearchError(f"cannot save a {name}: not one of {', '.join(classes)}")
    params: dict[str, Any] = {}
    for key, value in estimator.get_params(deep=False).items():
        if hasattr(value, "get_params"):
            params[key] = estimator_to_json(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            params[key] = value
        elif hasattr(value, "item"):
            params[key] = value.item()
        else:
            raise PlacementSearchError(f"cannot save parameter {key!r} of {name}: {type(value).__name__}")
    return {"class": name, "params": params}


def estimator_from_json(data: Any, where: str = "estimator") -> Any:
    """Inverse of :func:`estimator_to_json`; errors name the key path ``where``."""
    if not isinstance(data, dict) or "class" not in data or "params" not in data:
        raise PlacementSearchError(f"{where}: expected an object with 'class' and 'params'")
    cls = surrogate_classes().get(data["class"])
    if cls is None:
        raise PlacementSearchError(f"{where}.class: unknown surrogate class {data['class']!r}")
    params = data["params"]
    if not isinstance(params, dict):
        raise PlacementSearchError(f"{where}.params: expected an object")
    valid = set(cls().get_params(deep=False))
    unknown = sorted(set(params) - valid)
    if unknown:
        raise PlacementSearchError(f"{where}.params: unknown parameter {unknown[0]!r} for {cls.__name__}")
    kwargs = {
        key: estimator_from_json(value, f"{where}.params.{key}") if isinstance(value, dict) else value
        for key, value in params.items()
    }
    return cls(**kwargs)
