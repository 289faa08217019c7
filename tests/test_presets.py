"""Preset files (schema, consistency, atomic writes) and the serving formats (round trips)."""

from __future__ import annotations

import json
import os
import random

import pytest

from placement_search.errors import ConfigError, InputFileError, PresetError
from placement_search.formats import (
    deployment_config,
    export,
    placement_from_deployment_config,
    read_placements,
)
from placement_search.placement import Placement
from placement_search.presets import (
    BatchPolicy,
    Conditions,
    Figures,
    Preset,
    PresetFile,
    Quality,
    Throughput,
    read_presets,
    schema,
    write_presets,
)
from placement_search.spec import ModelSpec, get_spec

SPEC = get_spec("super-apriel-15b")
SPACE = SPEC.search_space


def random_placement(rng: random.Random) -> Placement:
    return Placement([rng.choice(SPACE.mixers) for _ in range(SPACE.num_layers)], SPACE)


def make_file(n: int = 4, seed: int = 0) -> PresetFile:
    rng = random.Random(seed)
    cond = Conditions(32768, BatchPolicy("max_fit", cap=256), "NVIDIA H200", 120.0)
    presets = [
        Preset(
            name=f"{level}x",
            placement=random_placement(rng),
            speed_level=level,
            predicted=Figures(
                Quality("teacher_trace_loglik_retention", 0.9 - 0.01 * i, 0.004, (0.89 - 0.01 * i, 0.91 - 0.01 * i), 0.8),
                Throughput(1000.0 * level, level, batch=32),
            ),
            conditions=cond,
            measured=Figures(throughput=Throughput(990.0 * level, level * 0.99)) if i == 0 else None,
        )
        for i, level in enumerate([1.5, 2.0, 3.0, 5.0][:n])
    ]
    return PresetFile.create(SPEC, presets, command="pytest", data=[{"name": "synthetic"}])


def test_schema_is_valid_json_schema() -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema())


def test_json_round_trip(tmp_path) -> None:
    pf = make_file()
    path = write_presets(pf, tmp_path / "p.json")
    back = read_presets(path)
    assert [p.placement for p in back.presets] == [p.placement for p in pf.presets]
    assert back.to_dict() == pf.to_dict()
    assert back["2.0x"].predicted.quality.interval == pf["2.0x"].predicted.quality.interval
    assert back.provenance["tool_version"] and back.provenance["created"]


def test_shipped_example_is_valid() -> None:
    here = os.path.dirname(__file__)
    pf = read_presets(os.path.join(here, "..", "examples", "hand-picked-15b.presets.json"))
    assert pf.config_hash == SPEC.config_hash and len(pf.presets) == 3


@pytest.mark.parametrize("fmt", ["json", "fast-llm-yaml", "deployment-config", "vllm"])
def test_every_format_round_trips(tmp_path, fmt: str) -> None:
    pf = make_file()
    out = tmp_path / "out"
    paths = export(pf, fmt, out, supernet_config=SPEC.config)
    placements = [q for path in paths for q in read_placements(path, SPACE)]
    assert placements == [p.placement for p in pf.presets]
    # one preset to one file
    one = export(pf, fmt, tmp_path / "one" / ("x.json" if fmt != "fast-llm-yaml" else "x.yaml"),
                 presets=["3.0x"], supernet_config=SPEC.config)
    assert len(one) == 1 and read_placements(one[0], SPACE) == [pf["3.0x"].placement]


def test_fast_llm_yaml_shape(tmp_path) -> None:
    import yaml

    pf = make_file(2)
    (path,) = export(pf, "fast-llm-yaml", tmp_path / "p.yaml")
    data = yaml.safe_load(path.read_text())
    assert list(data) == ["placements"] and len(data["placements"]) == 2
    assert all(len(x) == 48 and set(x) <= set(SPACE.mixers) for x in data["placements"])


def test_deployment_config_structure() -> None:
    p = Placement(["attention" if i % 4 == 0 else "gdn" for i in range(48)], SPACE)
    cfg = deployment_config(SPEC.config, p)
    dec = cfg["decoder"]
    assert dec["type"] == "pattern" and dec["num_blocks"] == 48 and dec["pattern"] == p.as_list()
    assert set(dec["blocks"]) == {"attention", "gdn"}
    assert dec["blocks"]["gdn"]["mixer"] == SPEC.config["decoder"]["block"]["mixer"]["mixers"]["gdn"]
    assert dec["blocks"]["attention"]["mlp"] == SPEC.config["decoder"]["block"]["mlp"]
    assert cfg["hidden_size"] == SPEC.hidden_size and "decoder" in SPEC.config  # source untouched
    assert SPEC.config["decoder"]["type"] == "fixed"
    spec = ModelSpec.from_config(cfg)
    assert [next(iter(layer.mixers)) for layer in spec.layers] == p.as_list()
    assert placement_from_deployment_config(cfg, SPACE) == p
    with pytest.raises(ConfigError, match="this one is a supernet"):
        placement_from_deployment_config(
            {**SPEC.config, "decoder": {"type": "pattern", "num_blocks": 48, "pattern": ["b"],
                                        "blocks": {"b": SPEC.config["decoder"]["block"]}}}, SPACE)


def _bad(data: dict, path: list, value) -> dict:
    node = data
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (["format_version"], 2, "format_version: 1 was expected"),
        (["presets", 1, "mixers", 5], "bogus", "presets[1] ('2.0x'): layer 5: unknown mixer 'bogus'"),
        (["presets", 0, "counts", "attention"], 99, "counts"),
        (["presets", 0, "code"], "AAAA", "code 'AAAA' does not match"),
        (["presets", 2, "predicted", "quality", "value"], "high", "presets[2].predicted.quality"),
        (["presets", 0, "conditions", "batch_policy"], {"kind": "fixed"}, "presets[0].conditions.batch_policy"),
        (["presets", 0, "conditions"], None, "has a throughput figure but no conditions"),
        (["presets", 1, "name"], "1.5x", "two presets are named '1.5x'"),
        (["model", "config_hash"], "xyz", "model.config_hash"),
        (["model", "num_layers"], 47, "model.num_layers is 47"),
        (["presets"], [], "presets"),
        (["provenance"], KeyError, "'provenance' is a required property"),
        (["presets", 0, "predicted", "quality", "interval"], [0.9, 0.1], "lower > upper"),
    ],
)
def test_invalid_files_name_the_culprit(tmp_path, path, value, needle) -> None:
    data = _bad(make_file().to_dict(), path, value)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(PresetError) as e:
        read_presets(f)
    msg = str(e.value)
    assert needle in msg and msg.startswith(str(f)) and "\n" not in msg


def test_non_finite_numbers_rejected(tmp_path) -> None:
    text = json.dumps(make_file().to_dict()).replace('"tokens_per_s": 1500.0', '"tokens_per_s": NaN', 1)
    f = tmp_path / "nan.json"
    f.write_text(text)
    with pytest.raises(InputFileError, match="NaN is not a JSON number"):
        read_presets(f)


def test_invalid_write_leaves_nothing(tmp_path) -> None:
    pf = make_file()
    target = tmp_path / "p.json"
    write_presets(pf, target)
    before = target.read_bytes()
    broken = PresetFile(pf.model_name, "not-a-hash", pf.space, pf.presets, pf.provenance)
    with pytest.raises(PresetError, match="config_hash"):
        write_presets(broken, target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.json"]


def test_batch_policy_parse() -> None:
    assert BatchPolicy.parse("fixed:16") == BatchPolicy("fixed", batch=16)
    assert BatchPolicy.parse("max_fit:64") == BatchPolicy("max_fit", cap=64)
    assert str(BatchPolicy.parse("max_fit")) == "max_fit"
    for bad in ("fixed", "fixed:x", "greedy"):
        with pytest.raises(PresetError):
            BatchPolicy.parse(bad)


def test_atomic_directory_replaces_or_leaves_untouched(tmp_path) -> None:
    from placement_search.files import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(target) as d:
        (d / "a.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "one"  # untouched
    with atomic_directory(target) as d:
        (d / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
