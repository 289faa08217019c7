"""Apriel2 checkpoints: round trip, thin loading, fixed/pattern export, and corrupt inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from placement_search.errors import PlacementError, PlacementSearchError
from placement_search.evaluators import (
    CheckpointError,
    Supernet,
    load_supernet,
    random_supernet,
    save_checkpoint,
)
from placement_search.spec import ModelSpec

F64 = torch.float64
MIXED = "AGSKG"


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def writer(runtime_make_config) -> Supernet:
    return random_supernet(ModelSpec.from_config(runtime_make_config(), name="tiny"), seed=3, dtype=F64)


@pytest.fixture(scope="module")
def sharded(writer: Supernet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(writer, tmp_path_factory.mktemp("ckpt") / "supernet", max_shard_bytes=600_000)


def logits(model: Supernet, placement: str, ids: torch.Tensor) -> torch.Tensor:
    model.set_placement(placement)
    with torch.no_grad():
        return model(ids)


def test_sharded_round_trip_reproduces_outputs(writer: Supernet, sharded: Path, ids: torch.Tensor):
    files = sorted(p.name for p in sharded.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert "model.decoder.blocks.4.mixer.mixers.kda.q_conv.weight" in index["weight_map"]
    loaded = load_supernet(sharded, dtype=F64)
    assert dict(loaded.named_parameters()).keys() == dict(writer.named_parameters()).keys()
    for placement in ("AAAAA", MIXED):
        assert torch.equal(logits(loaded, placement, ids), logits(writer, placement, ids))


def test_tied_head_biases_and_vision_tensors(runtime_make_config, tmp_path: Path, ids: torch.Tensor):
    config = runtime_make_config(tie=True, biases=True, vision=True)
    model = random_supernet(ModelSpec.from_config(config, name="v"), seed=0, dtype=F64)
    out = save_checkpoint(model, tmp_path / "v")
    saved = json.loads((out / "config.json").read_text())
    assert "vision_encoder" not in saved and saved["architectures"] == ["Apriel2ForCausalLM"]
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert "model.decoder.blocks.0.mixer.mixers.attention.q_proj.bias" in tensors
    # The released checkpoints carry vision tensors and a vision config: the text loader skips both.
    tensors["model.vision_encoder.patch_convolution.weight"] = torch.zeros(2, 3)
    tensors["model.multi_modal_projector.linear_1.weight"] = torch.zeros(2, 2)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_supernet(out, dtype=F64)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, MIXED, ids), logits(model, MIXED, ids))


def test_thin_loading_keeps_only_the_placements_mixers(writer: Supernet, sharded: Path, ids: torch.Tensor):
    thin = load_supernet(sharded, placements=[MIXED, "AAAAA"], dtype=F64)
    mixers = {n.split(".mixers.")[1].split(".")[0] for n, _ in thin.named_parameters() if ".mixers." in n}
    assert mixers == {"attention", "gdn", "sliding_window", "kda"}
    per_layer = [
        {n.split(".")[6] for n, _ in thin.named_parameters() if f"blocks.{i}.mixer." in n} for i in range(5)
    ]
    assert per_layer == [{"attention"}, {"attention", "gdn"}, {"attention", "sliding_window"},
                         {"attention", "kda"}, {"attention", "gdn"}]  # fmt: skip
    assert torch.equal(logits(thin, MIXED, ids), logits(writer, MIXED, ids))
    with pytest.raises(PlacementError, match="not loaded"):
        thin.set_placement("KKKKK")
    # A thin model saves as a pattern of stochastic blocks holding only its mixers, and loads back.
    out = save_checkpoint(thin, sharded.parent / "thin")
    again = load_supernet(out, dtype=F64)
    assert again.built == thin.built
    assert torch.equal(logits(again, MIXED, ids), logits(writer, MIXED, ids))


def test_pattern_export_reproduces_the_placement(writer: Supernet, sharded: Path, ids: torch.Tensor):
    out = save_checkpoint(writer, sharded.parent / "preset", placement=MIXED)
    config = json.loads((out / "config.json").read_text())
    decoder = config["decoder"]
    assert decoder["type"] == "pattern"
    assert decoder["pattern"] == ["attention", "gdn", "sliding_window", "kda", "gdn"]
    assert set(decoder["blocks"]) == {"attention", "gdn", "sliding_window", "kda"}
    assert decoder["blocks"]["sliding_window"]["mixer"]["window_size"] == 5
    names = load_file(out / "model.safetensors").keys()
    assert "model.decoder.blocks.1.mixer.in_proj_qkvz.weight" in names
    assert not any(".mixers." in n for n in names)
    preset = load_supernet(out, dtype=F64)
    assert preset.placement == ("attention", "gdn", "sliding_window", "kda", "gdn")
    assert torch.equal(logits(preset, MIXED, ids), logits(writer, MIXED, ids))


def test_missing_add_linear_biases_trusts_the_tensors(runtime_make_config, tmp_path: Path, ids: torch.Tensor):
    model = random_supernet(
        ModelSpec.from_config(runtime_make_config(biases=True), name="b"), seed=1, dtype=F64
    )
    with torch.no_grad():
        model.model.decoder.blocks[0].mixer.mixers["attention"].q_proj.bias.normal_()
    out = save_checkpoint(model, tmp_path / "b")
    config = json.loads((out / "config.json").read_text())
    for name in ("attention", "sliding_window"):
        del config["decoder"]["block"]["mixer"]["mixers"][name]["add_linear_biases"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="add_linear_biases"):
        loaded = load_supernet(out, dtype=F64)
    assert torch.equal(logits(loaded, "AAAAA", ids), logits(model, "AAAAA", ids))


def test_save_replaces_atomically(writer: Supernet, tmp_path: Path):
    target = tmp_path / "out"
    save_checkpoint(writer, target, max_shard_bytes=150_000)
    save_checkpoint(writer, target)  # now a single file: the old shards must be gone
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------------
# Corrupt checkpoints: each error names the tensor or file; nothing is returned half-loaded.


def _shard_of(ckpt: Path, name: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"][name]


def _edit_shard(ckpt: Path, name: str, edit) -> None:
    """Rewrite the shard holding ``name`` with ``edit(tensors)`` applied, and update the index to match."""
    shard = _shard_of(ckpt, name)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index_path.write_text(json.dumps(index))


@pytest.fixture
def copy_ckpt(sharded: Path, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    out.mkdir()
    for f in sharded.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


GDN_CONV = "model.decoder.blocks.2.mixer.mixers.gdn.convolution.weight"


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing", rf"1 missing tensor \({GDN_CONV}\)"),
        ("shape", rf"1 mis-shaped tensor \({GDN_CONV} \[3, 1, 4\] != \[112, 1, 4\]\)"),
        ("unexpected", r"1 unexpected tensor \(model\.decoder\.blocks\.2\.mixer\.mixers\.mamba\.A_log\)"),
        ("truncated", r"model-\d{5}-of-\d{5}\.safetensors: truncated or corrupt"),
        ("config", r"config\.json: invalid JSON at line 1"),
        ("index", r"model\.safetensors\.index\.json: invalid JSON"),
        ("index-lies", rf"model-\d{{5}}-of-\d{{5}}\.safetensors: lacks 1 indexed tensor \({GDN_CONV}\)"),
    ],
)
def test_corrupt_checkpoint_is_reported_by_name(copy_ckpt: Path, case: str, pattern: str):
    if case == "missing":
        _edit_shard(copy_ckpt, GDN_CONV, lambda t: t.pop(GDN_CONV))
    elif case == "shape":
        _edit_shard(copy_ckpt, GDN_CONV, lambda t: t.update({GDN_CONV: torch.zeros(3, 1, 4, dtype=F64)}))
    elif case == "unexpected":
        extra = "model.decoder.blocks.2.mixer.mixers.mamba.A_log"
        _edit_shard(copy_ckpt, GDN_CONV, lambda t: t.update({extra: torch.zeros(4, dtype=F64)}))
    elif case == "truncated":
        shard = _shard_of(copy_ckpt, GDN_CONV)
        shard.write_bytes(shard.read_bytes()[:-100])
    elif case == "config":
        (copy_ckpt / "config.json").write_text('{"hidden_size": 64,')
    elif case == "index":
        (copy_ckpt / "model.safetensors.index.json").write_text("{]")
    elif case == "index-lies":
        _edit_shard(copy_ckpt, GDN_CONV, lambda t: None)
        shard = _shard_of(copy_ckpt, GDN_CONV)
        tensors = load_file(shard)
        del tensors[GDN_CONV]
        save_file(tensors, shard)  # the index still promises the tensor
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_supernet(copy_ckpt, dtype=F64)
    assert isinstance(info.value, PlacementSearchError) and "\n" not in str(info.value)


def test_many_problems_are_counted(copy_ckpt: Path):
    _edit_shard(copy_ckpt, GDN_CONV, lambda t: t.clear())  # a whole shard's tensors gone
    with pytest.raises(CheckpointError, match=r"\d\d missing tensors \([^,]*, [^,]*, [^,]*, [^,]*, \.\.\.\)"):
        load_supernet(copy_ckpt)


def test_missing_weights_file_and_unsafe_index_paths(copy_ckpt: Path):
    index_path = copy_ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][GDN_CONV] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name in the directory"):
        load_supernet(copy_ckpt)
    index_path.unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_supernet(copy_ckpt)


def test_failure_while_copying_returns_nothing(sharded: Path, monkeypatch: pytest.MonkeyPatch):
    """Errors after validation (an I/O error mid-copy) still leave no model: load builds a fresh one."""
    from placement_search.evaluators import checkpoint

    real = checkpoint.safe_open
    calls = {"n": 0}

    class Flaky:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            calls["n"] += 1
            if calls["n"] == 20:
                raise OSError("Input/output error")
            return self.inner.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", Flaky)
    with pytest.raises(CheckpointError, match=r"model-\d{5}-of-\d{5}\.safetensors: cannot read tensors"):
        load_supernet(sharded, dtype=F64)


def test_export_of_an_unloaded_mixer_is_refused(sharded: Path, tmp_path: Path):
    thin = load_supernet(sharded, placements=["GGGGG"], dtype=F64)
    with pytest.raises(CheckpointError, match="layer 0 mixer 'kda' is not loaded"):
        save_checkpoint(thin, tmp_path / "x", placement="KGGGG")
    assert not any(tmp_path.iterdir())
