"""Model specs parsed from Apriel2 config.json."""

from __future__ import annotations

import copy
import json

import pytest

from placement_search.errors import ConfigError
from placement_search.spec import (
    AttentionSpec,
    GDNSpec,
    KDASpec,
    ModelSpec,
    get_spec,
    register_spec,
    spec_names,
)


@pytest.fixture
def config() -> dict:
    return copy.deepcopy(dict(get_spec("super-apriel-15b").config))


def test_builtin_15b_sizes() -> None:
    spec = get_spec("super-apriel-15b")
    assert spec.num_layers == 48 and spec.hidden_size == 5120 and spec.vocab_size == 131072
    assert spec.mixer_names == ("attention", "sliding_window", "gdn", "kda")
    att = spec.mixer(0, "attention")
    assert isinstance(att, AttentionSpec) and (att.heads, att.head_groups, att.head_size) == (32, 8, 128)
    assert att.window_size is None and spec.mixer(47, "sliding_window").window_size == 4096
    gdn = spec.mixer(3, "gdn")
    assert isinstance(gdn, GDNSpec) and (gdn.value_heads, gdn.key_heads, gdn.conv_dim) == (32, 8, 6144)
    kda = spec.mixer(3, "kda")
    assert isinstance(kda, KDASpec) and (kda.heads, kda.head_dim) == (32, 128)
    assert spec.layers[0].mlp.intermediate_size == 14336
    # apriel2.md §1: full text supernet ≈ 24.6B parameters (≈ 45.9 GiB bf16), all-attention ≈ 26.9 GiB.
    assert spec.supernet_params() / 1e9 == pytest.approx(24.6, abs=0.05)
    assert spec.supernet_params() * 2 / 2**30 == pytest.approx(45.9, abs=0.05)
    assert spec.placement_params(["attention"] * 48) * 2 / 2**30 == pytest.approx(26.9, abs=0.05)
    assert spec.search_space.size() == 4**48
    assert "super-apriel-15b" in spec_names()


def test_pattern_decoder(config: dict) -> None:
    block = config["decoder"].pop("block")
    thin = copy.deepcopy(block)
    thin["mixer"]["mixers"] = {k: v for k, v in thin["mixer"]["mixers"].items() if k in ("attention", "gdn")}
    config["decoder"] = {"type": "pattern", "num_blocks": 6, "pattern": ["full", "thin"],
                         "blocks": {"full": block, "thin": thin}}
    spec = ModelSpec.from_config(config)
    assert spec.num_layers == 6
    assert spec.search_space.allowed_at(1) == ("attention", "gdn")
    assert spec.search_space.allowed_at(2) == ("attention", "sliding_window", "gdn", "kda")
    assert spec.search_space.size() == 4**3 * 2**3


def test_fixed_non_stochastic_and_aliased_types(config: dict) -> None:
    config["decoder"]["block"]["mixer"] = {"type": "gated_delta_net", "value_heads": 4, "key_heads": 2,
                                           "key_head_dim": 8, "value_head_dim": 8}
    spec = ModelSpec.from_config(config)
    assert spec.mixer_names == ("gdn",) and not spec.layers[0].stochastic


def test_config_hash_is_canonical(config: dict) -> None:
    a = ModelSpec.from_config(config)
    reordered = json.loads(json.dumps(config, sort_keys=True))
    assert ModelSpec.from_config(reordered).config_hash == a.config_hash
    config["hidden_size"] = 4096
    assert ModelSpec.from_config(config).config_hash != a.config_hash


def test_from_file_and_registry(tmp_path, config: dict) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    spec = ModelSpec.from_file(tmp_path / "ckpt")
    assert spec.name == "ckpt" and spec.num_layers == 48
    register_spec("test-model", lambda: ModelSpec.from_file(tmp_path / "ckpt", name="test-model"))
    assert get_spec("test-model").name == "test-model"
    assert get_spec(str(tmp_path / "ckpt" / "config.json")).num_layers == 48
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        get_spec("nope")


def _mutate(config: dict, path: str, value) -> dict:
    node = config
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return config


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("hidden_size", KeyError, "hidden_size: missing"),
        ("hidden_size", "5120", 'hidden_size: expected a positive integer, got "5120"'),
        ("decoder.num_blocks", 0, "decoder.num_blocks: expected a positive integer, got 0"),
        ("decoder.type", "zigzag", "decoder.type: expected 'fixed' or 'pattern'"),
        ("decoder.block.mixer.mixers.gdn.value_heads", -1, "decoder.block.mixer.mixers.gdn.value_heads"),
        ("decoder.block.mixer.mixers.gdn.key_heads", 7, "7 does not divide value_heads=32"),
        ("decoder.block.mixer.mixers.kda.type", "mamba3", "decoder.block.mixer.mixers.kda.type: unsupported mixer type"),
        ("decoder.block.mixer.mixers.attention.rotary.theta", "big", "rotary.theta: expected a positive number"),
        ("decoder.block.mixer.mixers", {}, "decoder.block.mixer.mixers: is empty"),
        ("decoder.block.mixer.main_mixer_name", "mamba", "main_mixer_name: \"mamba\" is not one of"),
        ("decoder.block.mlp.activation", "gelu", "decoder.block.mlp.activation: only silu"),
        ("decoder.block", [], "decoder.block: expected an object"),
        ("tie_word_embeddings", "yes", "tie_word_embeddings: expected true or false"),
    ],
)
def test_errors_name_key_path(config: dict, path: str, value, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_config(_mutate(config, path, value), source="x/config.json")
    assert needle in str(e.value) and str(e.value).startswith("x/config.json: ")


def test_missing_add_linear_biases_warns(config: dict) -> None:
    del config["decoder"]["block"]["mixer"]["mixers"]["attention"]["add_linear_biases"]
    with pytest.warns(UserWarning, match="add_linear_biases missing"):
        ModelSpec.from_config(config)


def test_pattern_errors(config: dict) -> None:
    block = config["decoder"].pop("block")
    config["decoder"].update(type="pattern", pattern=["a", "b"], blocks={"a": block})
    with pytest.raises(ConfigError, match=r"decoder.pattern\[1\]: block \"b\" is not in decoder.blocks"):
        ModelSpec.from_config(config)
