"""Saving and loading surrogates: JSON and safetensors only, provenance, checksums, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placement_search.errors import PlacementSearchError
from placement_search.surrogate import (
    ClusterExpansion,
    EnsembleSurrogate,
    LinearSurrogate,
    XGBSurrogate,
    load_surrogate,
    save_surrogate,
)
from placement_search.surrogate.datasets import default_space, pairwise_quality, sample_uniform
from placement_search.surrogate.persistence import data_hash, read_manifest
from placement_search.surrogate.registry import estimator_to_json


@pytest.fixture(scope="module")
def data():
    quality = pairwise_quality(default_space(10), seed=0, noise_std=0.1)
    rng = np.random.default_rng(0)
    X = sample_uniform(quality.space, 150, rng)
    return X, quality.sample(X, rng), sample_uniform(quality.space, 40, rng)


MODELS = {
    "xgb": lambda: XGBSurrogate(n_estimators=30, include_counts=True),
    "ridge": lambda: LinearSurrogate(include_counts=True),
    "bayes": lambda: LinearSurrogate(prior="bayesian"),
    "cluster": lambda: ClusterExpansion(max_distance=2, prior="ridge", pair_alpha=2.0),
    "ensemble-xgb": lambda: EnsembleSurrogate(XGBSurrogate(n_estimators=20), n_members=3),
    "ensemble-cluster": lambda: EnsembleSurrogate(ClusterExpansion(max_distance=1), n_members=2, resample="none"),
}


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_gives_identical_predictions(tmp_path, data, name):
    X, y, X_test = data
    model = MODELS[name]().fit(X, y)
    path = save_surrogate(model, tmp_path / "model", X=X, y=y, metrics={"r2": 0.5})
    loaded = load_surrogate(path)
    assert type(loaded) is type(model)
    assert estimator_to_json(loaded) == estimator_to_json(model)
    np.testing.assert_array_equal(loaded.predict(X_test), model.predict(X_test))
    if hasattr(model, "predict_interval"):
        for a, b in zip(loaded.predict_interval(X_test, 0.2), model.predict_interval(X_test, 0.2), strict=True):
            np.testing.assert_array_equal(a, b)
    elif name != "xgb":
        np.testing.assert_array_equal(loaded.predict(X_test, return_std=True)[1], model.predict(X_test, return_std=True)[1])
    if isinstance(model, ClusterExpansion):
        np.testing.assert_array_equal(loaded.pair_[2], model.pair_[2])
    assert not list(path.rglob("*.pkl")) and not list(path.rglob("*.pickle"))


def test_manifest_provenance(tmp_path, data):
    X, y, _ = data
    model = ClusterExpansion(max_distance=1).fit(X, y)
    path = save_surrogate(model, tmp_path / "m", X=X, y=y, metrics={"spearman": 0.9}, extra={"note": "test"})
    manifest = read_manifest(path)
    assert manifest["class"] == "ClusterExpansion"
    assert manifest["estimator"]["params"]["max_distance"] == 1
    assert manifest["space"] == X[0].space.to_dict()
    assert manifest["training"] == {"n_samples": 150, "sha256": data_hash(X, y)}
    assert manifest["metrics"] == {"spearman": 0.9} and manifest["extra"] == {"note": "test"}
    assert {"python", "numpy", "scikit-learn", "xgboost", "placement-search"} <= set(manifest["versions"])
    assert manifest["created"] and set(manifest["files"]) == {"state.json", "training_indices.safetensors"}
    state = json.loads((path / "state.json").read_text())
    assert isinstance(state["fit"]["coef"], list)


def test_save_replaces_atomically_and_refuses_foreign_directory(tmp_path, data):
    X, y, _ = data
    target = tmp_path / "model"
    save_surrogate(LinearSurrogate().fit(X, y), target)
    second = XGBSurrogate(n_estimators=10).fit(X, y)
    save_surrogate(second, target)
    assert isinstance(load_surrogate(target), XGBSurrogate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary leftovers
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PlacementSearchError, match="not overwriting"):
        save_surrogate(second, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_corrupted_file_is_rejected_with_one_line(tmp_path, data):
    X, y, _ = data
    path = save_surrogate(EnsembleSurrogate(XGBSurrogate(n_estimators=5), n_members=2).fit(X, y), tmp_path / "m")
    booster = path / "member_001" / "booster.json"
    booster.write_bytes(booster.read_bytes()[:-50])
    with pytest.raises(PlacementSearchError) as excinfo:
        load_surrogate(path)
    message = _one_line(excinfo)
    assert "member_001/booster.json" in message and "checksum" in message


def test_edited_state_with_fixed_checksum_names_the_key(tmp_path, data):
    X, y, _ = data
    path = save_surrogate(LinearSurrogate().fit(X, y), tmp_path / "m")
    state = json.loads((path / "state.json").read_text())
    del state["fit"]["intercept"]
    _rewrite(path, "state.json", json.dumps(state).encode())
    with pytest.raises(PlacementSearchError) as excinfo:
        load_surrogate(path)
    assert "state.json" in _one_line(excinfo) and "'intercept'" in str(excinfo.value)
    state["fit"]["intercept"] = 1.0
    state["fit"]["coef"] = state["fit"]["coef"][:-1]
    _rewrite(path, "state.json", json.dumps(state).encode())
    with pytest.raises(PlacementSearchError, match=r"'coef'.*shape"):
        load_surrogate(path)


def test_bad_booster_with_fixed_checksum(tmp_path, data):
    X, y, _ = data
    path = save_surrogate(XGBSurrogate(n_estimators=5).fit(X, y), tmp_path / "m")
    _rewrite(path, "booster.json", b'{"learner": 1}')
    with pytest.raises(PlacementSearchError) as excinfo:
        load_surrogate(path)
    assert "booster.json" in _one_line(excinfo)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format="other"), "'format'"),
        (lambda m: m.update(format_version=99), "'format_version'"),
        (lambda m: m["estimator"].update({"class": "Pickled"}), "estimator.class"),
        (lambda m: m["estimator"]["params"].update(bogus=1), "bogus"),
        (lambda m: m["files"].update({"../x": "0"}), "unsafe"),
    ],
)
def test_bad_manifest(tmp_path, data, edit, match):
    X, y, _ = data
    path = save_surrogate(LinearSurrogate().fit(X, y), tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    if manifest["estimator"]["class"] == "Pickled":
        manifest["class"] = "Pickled"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PlacementSearchError, match=match) as excinfo:
        load_surrogate(path)
    _one_line(excinfo)


def test_missing_and_invalid_manifest(tmp_path):
    with pytest.raises(PlacementSearchError, match="no such directory"):
        load_surrogate(tmp_path / "nothing")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(PlacementSearchError, match=r"manifest\.json: invalid JSON") as excinfo:
        load_surrogate(tmp_path / "m")
    _one_line(excinfo)


def _rewrite(path, name, data):
    """Replace a file and fix its checksum, as a careless hand edit would."""
    import hashlib

    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def _size(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cluster24():
    """A cluster expansion wide enough for the covariance to dominate (24 layers: 792 weights)."""
    quality = pairwise_quality(default_space(24), seed=0, max_distance=2, noise_std=0.1)
    rng = np.random.default_rng(1)
    X = sample_uniform(quality.space, 400, rng)
    return ClusterExpansion(max_distance=2, prior="ridge", pair_alpha=4.0).fit(X, quality.sample(X, rng)), X


def test_covariance_forms_size_and_std(tmp_path, cluster24):
    model, X = cluster24
    _, std = model.predict(X[:50], return_std=True)
    sizes = {}
    for form in ("design", "float32", "float64", "none"):
        path = save_surrogate(model, tmp_path / form, covariance=form)
        sizes[form] = _size(path)
        loaded = load_surrogate(path)
        np.testing.assert_array_equal(loaded.predict(X[:50]), model.predict(X[:50]))
        if form == "none":
            with pytest.raises(PlacementSearchError, match="without its posterior covariance"):
                loaded.predict(X[:50], return_std=True)
            continue
        got = loaded.predict(X[:50], return_std=True)[1]
        if form == "float32":
            np.testing.assert_allclose(got, std, rtol=1e-5)
        else:
            np.testing.assert_array_equal(got, std)  # design: rebuilt with the fit's own arithmetic
    dense = 792 * 792 * 8
    assert sizes["float64"] > dense and sizes["float32"] > dense // 2
    assert sizes["design"] < dense // 20 and sizes["none"] < sizes["design"]


def test_design_form_survives_a_second_save_and_bayesian_prior(tmp_path, data):
    X, y, X_test = data
    for model in (LinearSurrogate(prior="bayesian", include_counts=True).fit(X, y),
                  ClusterExpansion(max_distance=2, prior="bayesian").fit(X, y)):
        once = load_surrogate(save_surrogate(model, tmp_path / "a"))
        twice = load_surrogate(save_surrogate(once, tmp_path / "b"))
        assert "training_indices.safetensors" in read_manifest(tmp_path / "b")["files"]
        np.testing.assert_array_equal(twice.predict(X_test, return_std=True)[1], model.predict(X_test, return_std=True)[1])
    with pytest.raises(PlacementSearchError, match="covariance must be one of"):
        save_surrogate(model, tmp_path / "c", covariance="half")


def test_kfold_ensemble_stores_one_covariance(tmp_path, data):
    X, y, X_test = data
    model = EnsembleSurrogate(ClusterExpansion(max_distance=2, prior="ridge"), n_members=3, resample="kfold").fit(X, y)
    path = save_surrogate(model, tmp_path / "m")
    files = set(read_manifest(path)["files"])
    assert "final/training_indices.safetensors" in files
    assert not any(name.startswith("member_") and name.endswith(".safetensors") for name in files)
    loaded = load_surrogate(path)
    for a, b in zip(loaded.predict_interval(X_test, 0.1), model.predict_interval(X_test, 0.1), strict=True):
        np.testing.assert_array_equal(a, b)


def test_indices_file_is_checked(tmp_path, data):
    from placement_search.surrogate.persistence import array_to_bytes

    X, y, _ = data
    path = save_surrogate(LinearSurrogate().fit(X, y), tmp_path / "m")
    _rewrite(path, "training_indices.safetensors", array_to_bytes(np.full((150, 10), 7, dtype=np.int8)))
    with pytest.raises(PlacementSearchError, match="mixer indices outside") as excinfo:
        load_surrogate(path)
    _one_line(excinfo)
