"""``placement-search export``: preset JSON -> Fast-LLM YAML, deployment config.json, vLLM list."""

from __future__ import annotations

import argparse

from placement_search.errors import PlacementSearchError
from placement_search.files import load_json
from placement_search.formats import FORMATS, export
from placement_search.presets import read_presets
from placement_search.spec import get_spec, spec_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="convert a preset file to the formats serving code reads",
        description="Write the presets of PRESETS (a preset JSON file) in another format. "
        + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()),
    )
    p.add_argument("presets", metavar="PRESETS", help="preset JSON file")
    p.add_argument("--format", "-f", required=True, choices=list(FORMATS), help="output format")
    p.add_argument("--out", "-o", required=True, help="output file (or directory, for several presets)")
    p.add_argument("--preset", "-p", action="append", default=None, help="export only this preset (repeatable)")
    p.add_argument(
        "--config",
        default=None,
        help="the supernet's config.json (deployment-config; default: the built-in spec the file names)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pf = read_presets(args.presets)
    config, source = None, "config.json"
    if args.format == "deployment-config":
        if args.config is not None:
            config, source = load_json(args.config), args.config
        elif pf.model_name in spec_names():
            spec = get_spec(pf.model_name)
            if spec.config_hash != pf.config_hash:
                raise PlacementSearchError(
                    f"{args.presets}: config_hash {pf.config_hash} differs from the built-in {pf.model_name} "
                    f"({spec.config_hash}); pass the supernet's config.json with --config"
                )
            config, source = dict(spec.config), f"built-in {pf.model_name}"
        else:
            raise PlacementSearchError(
                f"{args.presets}: model {pf.model_name!r} is not built in; pass its config.json with --config"
            )
    for path in export(pf, args.format, args.out, presets=args.preset, supernet_config=config, config_source=source):
        print(f"wrote {path}")
    return 0
