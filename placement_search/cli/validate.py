"""``placement-search validate``: check a placement, placement file, preset file or config.json."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from placement_search.errors import PresetError
from placement_search.files import load_structured
from placement_search.formats import placement_from_deployment_config
from placement_search.placement import Placement, placements_from_data
from placement_search.presets import PresetFile, is_preset_data
from placement_search.spec import DEFAULT_SPEC, ModelSpec, get_spec


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a placement, a placement file, a preset file or an Apriel2 config.json",
        description="Check THING and print 'ok' with a one-line summary, or the precise error (exit 2). "
        "THING is a placement (compact code like AAGK..., comma list like attention*24,gdn*24), "
        "a placement file (JSON, Fast-LLM YAML, vLLM list), a preset JSON file, or a config.json.",
    )
    p.add_argument("thing", metavar="THING", help="placement string or file path")
    p.add_argument(
        "--model",
        default=None,
        help=f"built-in model name or config.json path the placement must fit (default {DEFAULT_SPEC})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(validate(args.thing, args.model))
    return 0


def _is_file(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long to be a path, or with a NUL byte
        return False


def validate(thing: str, model: str | None = None) -> str:
    """Validate ``thing`` and return the one-line ``ok: ...`` summary (raises on error)."""
    path = Path(thing)
    if not _is_file(path):
        spec = get_spec(model or DEFAULT_SPEC)
        p = Placement.from_string(thing, spec.search_space)
        return f"ok: placement {p.code()} ({p.counts_string()}) fits {spec.name}"
    data = load_structured(path)
    if is_preset_data(data):
        pf = PresetFile.from_dict(data, source=str(path))
        if model is not None:
            spec = get_spec(model)
            if spec.config_hash != pf.config_hash:
                raise PresetError(
                    f"{path}: model.config_hash {pf.config_hash} is not {spec.name}'s ({spec.config_hash})"
                )
            for preset in pf.presets:
                Placement(preset.mixers, spec.search_space)
        levels = ", ".join(f"{p.name}" for p in pf.presets)
        return f"ok: preset file for {pf.model_name} ({pf.space.num_layers} layers): {len(pf.presets)} presets: {levels}"
    if isinstance(data, Mapping) and "decoder" in data:
        spec = ModelSpec.from_config(data, name=path.parent.name or path.stem, source=str(path))
        if spec.layers[0].stochastic:
            return (
                f"ok: Apriel2 supernet config: {spec.num_layers} layers, mixers {'/'.join(spec.mixer_names)}, "
                f"hidden {spec.hidden_size}, {spec.supernet_params() / 1e9:.2f}B parameters"
            )
        target = get_spec(model) if model else spec
        if data["decoder"].get("type") == "pattern":
            p = placement_from_deployment_config(data, target.search_space, str(path))
            return f"ok: Apriel2 deployment config serving {p.code()} ({p.counts_string()})"
        return f"ok: Apriel2 config: {spec.num_layers} layers of {spec.mixer_names[0]}, hidden {spec.hidden_size}"
    spec = get_spec(model or DEFAULT_SPEC)
    placements = placements_from_data(data, spec.search_space, str(path))
    if len(placements) == 1:
        p = placements[0]
        return f"ok: placement {p.code()} ({p.counts_string()}) fits {spec.name}"
    return f"ok: {len(placements)} placements fit {spec.name}"
