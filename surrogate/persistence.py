"""Saving and loading fitted surrogates, with provenance, without pickle.

A saved surrogate is a folder::

    manifest.json   format, class and params, search space, training-data hash and size,
                    metrics, tool and library versions, date, and the SHA-256 of every other file
    state.json      the fitted state (linear/cluster weights as JSON arrays, ensemble members...)
    booster.json    an XGBoost model in XGBoost's JSON format (``member_000/booster.json``... in ensembles)
    training_indices.safetensors  the training rows as mixer indices (int8), from which a linear or
                    cluster model rebuilds its posterior covariance (the default, ``covariance="design"``)
    covariance.safetensors  a dense posterior covariance (``covariance="float32"`` or ``"float64"``)

Everything binary is safetensors (no pickle, no code). Sizes, for the 48-layer Super Apriel space
fitted on 1440 rows: a cluster expansion (2448 weights) is about 0.2 MB with ``"design"`` against
24 MB with ``"float32"`` and 48 MB with ``"float64"`` (the only form before); an ensemble of five is
five times that.

The folder is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written model. :func:`load_surrogate` checks the format, every checksum and every key, and
raises a one-line :class:`SurrogateFileError` naming the file (and key) at fault.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from placement_search import __version__
from placement_search.errors import PlacementSearchError
from placement_search.files import atomic_directory, load_json
from placement_search.placement import SearchSpace
from placement_search.surrogate.features import as_onehot

FORMAT = "placement-search-surrogate"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"


class SurrogateFileError(PlacementSearchError):
    """A saved surrogate that is missing, corrupted or inconsistent (one line naming file and key)."""


# -- helpers shared with the estimators' get_state/set_state ---------------------------------


def array_to_bytes(arr: np.ndarray) -> bytes:
    """An array as safetensors bytes (one tensor named ``array``)."""
    from safetensors.numpy import save

    return save({"array": np.ascontiguousarray(arr)})


def bytes_to_array(
    data: bytes, name: str, shape: tuple[int, ...] | None = None, dtype: Any = np.float64
) -> np.ndarray:
    """Parse safetensors bytes written by :func:`array_to_bytes`, check the shape, convert to ``dtype``."""
    from safetensors.numpy import load

    try:
        arr = load(data)["array"]
    except Exception as e:  # safetensors raises its own error types for any malformed header
        raise SurrogateFileError(f"{name}: not a valid safetensors array ({type(e).__name__})") from None
    if shape is not None and arr.shape != shape:
        raise SurrogateFileError(f"{name}: shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise SurrogateFileError(f"{name}: holds non-finite values")
    return np.asarray(arr, dtype=dtype)


def state_array(state: Mapping[str, Any], key: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """``state[key]`` as a finite float64 array of the given shape."""
    if key not in state:
        raise SurrogateFileError(f"missing key {key!r}")
    try:
        arr = np.asarray(state[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise SurrogateFileError(f"key {key!r}: not an array of numbers") from None
    if shape is None and arr.ndim != 1:
        raise SurrogateFileError(f"key {key!r}: expected a flat array")
    if shape is not None and arr.shape != shape:
        raise SurrogateFileError(f"key {key!r}: shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise SurrogateFileError(f"key {key!r}: holds non-finite values")
    return arr


def state_float(state: Mapping[str, Any], key: str) -> float:
    """``state[key]`` as a finite float."""
    if key not in state:
        raise SurrogateFileError(f"missing key {key!r}")
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise SurrogateFileError(f"key {key!r}: expected a finite number, got {value!r}")
    return float(value)


def data_hash(X: Any, y: Any) -> str:
    """SHA-256 of the training data (one-hot matrix as int8 plus targets as float64), hex."""
    oh = as_onehot(X)
    digest = hashlib.sha256()
    digest.update(f"{oh.num_samples}x{oh.num_layers}x{oh.num_mixers}".encode())
    digest.update(oh.matrix.astype(np.int8).tobytes())
    digest.update(np.asarray(y, dtype=np.float64).reshape(-1).tobytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a surrogate depends on."""
    import pandas
    import sklearn
    import xgboost

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "scikit-learn": sklearn.__version__,
        "xgboost": xgboost.__version__,
        "placement-search": __version__,
    }


def _jsonable(value: Any) -> Any:
    """DataFrames to records, NumPy scalars/arrays to Python, recursively."""
    if hasattr(value, "to_dict") and hasattr(value, "columns"):
        return [_jsonable(r) for r in value.to_dict("records")]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# -- save -------------------------------------------------------------------------------------


def save_surrogate(
    model: Any,
    directory: str | os.PathLike[str],
    *,
    X: Any = None,
    y: Any = None,
    metrics: Any = None,
    space: SearchSpace | None = None,
    extra: Mapping[str, Any] | None = None,
    covariance: str = "design",
) -> Path:
    """Save a fitted surrogate to ``directory`` (created or replaced atomically) and return it.

    ``X``/``y`` (the training data) give the data hash and size in the manifest; ``metrics`` is any
    JSON-ready value or a DataFrame; ``space`` defaults to the one the model was fitted on;
    ``extra`` adds free-form provenance (e.g. the command line). ``covariance`` is how linear and
    cluster models (also as ensemble members) store their posterior covariance: ``"design"``
    (default: exact, rebuilt on first ``return_std``), ``"float32"``, ``"float64"`` or ``"none"``
    (no ``return_std`` after loading); see :mod:`placement_search.surrogate.linear`.
    """
    from placement_search.surrogate.linear import COVARIANCE_FORMS
    from placement_search.surrogate.registry import estimator_to_json

    if covariance not in COVARIANCE_FORMS:
        raise SurrogateFileError(f"covariance must be one of {', '.join(COVARIANCE_FORMS)}, got {covariance!r}")
    target = Path(directory)
    estimator = estimator_to_json(model)
    state, files = model.get_state(covariance=covariance)
    if space is None:
        space = getattr(model, "space_", None)
    training: dict[str, Any] | None = None
    if X is not None and y is not None:
        training = {"n_samples": as_onehot(X).num_samples, "sha256": data_hash(X, y)}
    state_bytes = (json.dumps(state, indent=1, allow_nan=False) + "\n").encode()
    all_files = {STATE: state_bytes, **files}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": estimator["class"],
        "estimator": estimator,
        "space": None if space is None else space.to_dict(),
        "training": training,
        "metrics": _jsonable(metrics),
        "tool": {"name": "placement-search", "version": __version__},
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "extra": _jsonable(dict(extra or {})),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(all_files.items())},
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise SurrogateFileError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise SurrogateFileError(f"{target}: directory is not empty and holds no saved surrogate; not overwriting")
    with atomic_directory(target, fsync=False) as tmp:  # _write_synced flushes each file itself
        for name, data in all_files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_synced(path, data)
        _write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
    return target


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- load -------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of a saved surrogate."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise SurrogateFileError(f"{directory}: no such directory")
    try:
        manifest = load_json(path)
    except PlacementSearchError as e:
        raise SurrogateFileError(str(e)) from None
    if not isinstance(manifest, dict):
        raise SurrogateFileError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise SurrogateFileError(f"{path}: key 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SurrogateFileError(
            f"{path}: key 'format_version' is {manifest.get('format_version')!r}, this version reads {FORMAT_VERSION}"
        )
    for key, kind in (("estimator", dict), ("files", dict), ("class", str)):
        if not isinstance(manifest.get(key), kind):
            raise SurrogateFileError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
    if STATE not in manifest["files"]:
        raise SurrogateFileError(f"{path}: key 'files' does not list {STATE!r}")
    return manifest


def load_surrogate(directory: str | os.PathLike[str]) -> Any:
    """Load a surrogate saved by :func:`save_surrogate`, checking checksums and structure."""
    from placement_search.surrogate.registry import estimator_from_json

    root = Path(directory)
    manifest = read_manifest(root)
    manifest_path = root / MANIFEST
    files: dict[str, bytes] = {}
    for name, digest in manifest["files"].items():
        path = root / name
        if not isinstance(name, str) or ".." in Path(name).parts or Path(name).is_absolute():
            raise SurrogateFileError(f"{manifest_path}: key 'files' lists an unsafe path {name!r}")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SurrogateFileError(f"{path}: missing (listed in {MANIFEST})") from None
        except OSError as e:
            raise SurrogateFileError(f"{path}: cannot read ({e.strerror or e})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise SurrogateFileError(f"{path}: checksum does not match {MANIFEST} (file corrupted or edited)")
        files[name] = data
    state_path = root / STATE
    try:
        state = json.loads(files[STATE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurrogateFileError(f"{state_path}: invalid JSON ({e})") from None
    if not isinstance(state, dict):
        raise SurrogateFileError(f"{state_path}: expected a JSON object")
    if manifest["estimator"].get("class") != manifest["class"]:
        raise SurrogateFileError(f"{manifest_path}: key 'class' does not match 'estimator.class'")
    try:
        model = estimator_from_json(manifest["estimator"], "estimator")
    except PlacementSearchError as e:
        raise SurrogateFileError(f"{manifest_path}: {e}") from None
    try:
        model.set_state(state, {k: v for k, v in files.items() if k != STATE})
    except KeyError as e:
        raise SurrogateFileError(f"{state_path}: missing key {e.args[0]!r}") from None
    except PlacementSearchError as e:
        raise SurrogateFileError(f"{state_path}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise SurrogateFileError(f"{state_path}: malformed state ({type(e).__name__}: {e})") from None
    with contextlib.suppress(AttributeError):
        model.manifest_ = manifest
    return model
