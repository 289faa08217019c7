"""Serving formats: export presets to what the serving code reads, and read them back.

- ``json``: the preset file itself (:mod:`placement_search.presets`).
- ``fast-llm-yaml``: ``placements: [[name, ...], ...]``, the YAML Fast-LLM's ``thin_supernet.py``
  reads (it also reads ``layers: [...]``; both import).
- ``deployment-config``: a fixed-deployment ``config.json`` over the unchanged supernet weights:
  the supernet config with its decoder replaced by a ``pattern`` decoder whose block names are the
  mixer names (apriel2.md §5). One per preset.
- ``vllm``: the plain JSON list of N mixer names for ``collective_rpc("set_layer_placements", ...)``.
  One per preset.

Every exporter writes atomically; every format imports back to identical placements.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from placement_search.errors import ConfigError, PlacementError, PlacementSearchError
from placement_search.files import load_structured, write_json_atomic, write_text_atomic
from placement_search.placement import Placement, SearchSpace, placements_from_data
from placement_search.presets import PresetFile, is_preset_data, write_presets
from placement_search.spec import ModelSpec

FORMATS: dict[str, str] = {
    "json": "the preset file (JSON, validated against the schema)",
    "fast-llm-yaml": "Fast-LLM placement YAML (placements: list of lists) for thin_supernet.py",
    "deployment-config": "fixed-deployment config.json (pattern decoder over the supernet weights), one per preset",
    "vllm": "JSON list of mixer names for vLLM's set_layer_placements, one per preset",
}


# --------------------------------------------------------------------------------------------
# Exporters (pure: placements in, data out)


def fast_llm_yaml(placements: Sequence[Placement], names: Sequence[str] | None = None, header: str = "") -> str:
    """The Fast-LLM placement YAML for ``placements`` (comments name each one)."""
    lines = [f"# {line}" for line in header.splitlines() if line.strip()]
    for i, p in enumerate(placements):
        label = f" {names[i]}" if names is not None else ""
        lines.append(f"# [{i}]{label}: {p.code()} ({p.counts_string()})")
    body = yaml.safe_dump({"placements": [p.as_list() for p in placements]}, default_flow_style=None, width=1 << 16)
    return "\n".join(lines) + ("\n" if lines else "") + body


def vllm_placement(placement: Placement) -> list[str]:
    """The list vLLM's ``set_layer_placements`` takes: one mixer name per layer."""
    return placement.as_list()


def deployment_config(supernet_config: Mapping[str, Any], placement: Placement, source: str = "config.json") -> dict:
    """A ``config.json`` that serves ``placement`` over the unchanged supernet weights.

    The decoder becomes ``{"type": "pattern", "num_blocks": N, "pattern": [N names], "blocks":
    {name: {"mixer": <leaf mixer>, "mlp", "normalization"}}}``; everything else is kept.
    """
    spec = ModelSpec.from_config(supernet_config, source=source)
    try:
        placement = Placement(placement.mixers, spec.search_space)
    except PlacementError as e:
        raise ConfigError(f"{source}: placement does not fit this supernet: {e}") from None
    decoder = supernet_config["decoder"]
    blocks: dict[str, dict[str, Any]] = {}
    for layer, name in enumerate(placement.mixers):
        block = _block_config(decoder, layer)
        mixer = block["mixer"]
        leaf = mixer["mixers"][name] if mixer.get("type") == "stochastic" else mixer
        entry = {"mixer": copy.deepcopy(leaf), "mlp": copy.deepcopy(block["mlp"])}
        if "normalization" in block:
            entry["normalization"] = copy.deepcopy(block["normalization"])
        if name in blocks and blocks[name] != entry:
            raise ConfigError(
                f"{source}: layer {layer}: mixer {name!r} differs from its config at an earlier layer, so blocks "
                "cannot be keyed by mixer name"
            )
        blocks[name] = entry
    out = copy.deepcopy(dict(supernet_config))
    out["decoder"] = {
        "type": "pattern",
        "num_blocks": spec.num_layers,
        "pattern": placement.as_list(),
        "blocks": blocks,
    }
    return out


def _block_config(decoder: Mapping[str, Any], layer: int) -> Mapping[str, Any]:
    if decoder.get("type", "fixed") == "fixed":
        return decoder["block"]
    pattern = decoder["pattern"]
    return decoder["blocks"][pattern[layer % len(pattern)]]


# --------------------------------------------------------------------------------------------
# Importers


def placement_from_deployment_config(config: Mapping[str, Any], space: SearchSpace, source: str = "config.json") -> Placement:
    """The placement a fixed-deployment (``pattern``) config serves."""
    spec = ModelSpec.from_config(config, source=source)
    decoder = config["decoder"]
    if decoder.get("type") != "pattern":
        raise ConfigError(f"{source}: decoder.type: a deployment config has a 'pattern' decoder, got {decoder.get('type')!r}")
    if any(layer.stochastic for layer in spec.layers):
        raise ConfigError(f"{source}: decoder: a deployment config has one mixer per block, this one is a supernet")
    pattern = decoder["pattern"]
    names = [pattern[i % len(pattern)] for i in range(spec.num_layers)]
    try:
        return Placement(names, space)
    except PlacementError as e:
        raise PlacementError(f"{source}: decoder.pattern: {e}") from None


def read_placements(path: str | os.PathLike[str], space: SearchSpace) -> list[Placement]:
    """Placements from any supported file: a preset file, a Fast-LLM YAML, a deployment
    ``config.json``, a vLLM list, or a JSON ``{"layers": [...]}`` file."""
    data = load_structured(path)
    source = str(path)
    if is_preset_data(data):
        pf = PresetFile.from_dict(data, source=source)
        return [Placement(p.mixers, space) for p in pf.presets]
    if isinstance(data, Mapping) and "decoder" in data:
        return [placement_from_deployment_config(data, space, source)]
    return placements_from_data(data, space, source)


# --------------------------------------------------------------------------------------------
# Writing files


def safe_filename(name: str) -> str:
    """A preset name turned into a file name (letters, digits, ``.``, ``_``, ``-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "preset"
    return cleaned[:100]


def export(
    preset_file: PresetFile,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    presets: Sequence[str] | None = None,
    supernet_config: Mapping[str, Any] | None = None,
    config_source: str = "config.json",
) -> list[Path]:
    """Write ``preset_file`` (or the named ``presets``) in format ``fmt`` to ``out``.

    ``json`` and ``fast-llm-yaml`` write one file at ``out``. ``vllm`` and ``deployment-config``
    write one file per preset: at ``out`` itself when one preset is selected, otherwise
    ``out/<name>.json`` (vllm) or ``out/<name>/config.json`` (deployment-config).
    """
    if fmt not in FORMATS:
        raise PlacementSearchError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    chosen = [preset_file[n] for n in presets] if presets else list(preset_file.presets)
    out = Path(out)
    if fmt == "json":
        subset = PresetFile(preset_file.model_name, preset_file.config_hash, preset_file.space, tuple(chosen),
                            preset_file.provenance)
        return [write_presets(subset, out)]
    if fmt == "fast-llm-yaml":
        header = f"placement-search presets for {preset_file.model_name} (config {preset_file.config_hash})"
        text = fast_llm_yaml([p.placement for p in chosen], [p.name for p in chosen], header)
        return [write_text_atomic(out, text)]
    if fmt == "deployment-config" and supernet_config is None:
        raise PlacementSearchError("deployment-config needs the supernet's config.json (--config)")
    written: list[Path] = []
    for p in chosen:
        if fmt == "vllm":
            target = out if len(chosen) == 1 else out / f"{safe_filename(p.name)}.json"
            written.append(write_json_atomic(target, vllm_placement(p.placement)))
        else:
            assert supernet_config is not None
            target = out if len(chosen) == 1 else out / safe_filename(p.name) / "config.json"
            if len(chosen) == 1 and (out.is_dir() or not out.suffix):
                target = out / "config.json"
            written.append(write_json_atomic(target, deployment_config(supernet_config, p.placement, config_source)))
    return written
