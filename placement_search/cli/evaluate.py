"""``placement-search evaluate``: score placements of a checkpoint on a task pack, into a SQLite database.

Thin: parses arguments and calls :func:`placement_search.evaluators.campaign.run_campaign` (see there for the
keys, the resumability and the scoring conventions).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from placement_search.errors import PlacementSearchError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "evaluate",
        help="evaluate many placements of a checkpoint on lm-eval tasks (resumable, SQLite)",
        description="Evaluate placements of a supernet checkpoint on a task pack directory or lm-eval task names; "
        "each placement is stored as it finishes and a rerun skips what is done.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="Apriel2 checkpoint directory (with tokenizer)")
    p.add_argument("--tasks", required=True, metavar="DIR_OR_NAMES", help="task pack directory or comma-separated names")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--placements", metavar="FILE", help="JSON/YAML file of placements")
    src.add_argument("--sample", metavar="SPEC", help="e.g. uniform:200,stratified:200,structured:50")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--db", default="results.sqlite", metavar="FILE", help="results database (default results.sqlite)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward (default 16)")
    p.add_argument("--max-length", type=int, default=None, metavar="N", help="longest sequence (default: config)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="start no placement after M minutes (the rest stays for a rerun, which resumes)")
    p.add_argument("--share-contexts", choices=["auto", "yes", "no"], default="auto",
                   help="score requests sharing a context (multiple choice) from one context pass; "
                        "auto: on CPU only (default)")
    p.add_argument("--cuda-graphs", choices=["auto", "yes", "no"], default="auto",
                   help="run each layer as a CUDA graph, checked against the eager forward first (on CPU, yes runs "
                        "the same per-layer schedule eagerly); auto: on CUDA")
    p.add_argument("--order-window", type=int, default=0, metavar="N",
                   help="evaluate each N placements in code order, so neighbours share leading layers that the "
                        "graphed forward does not recompute (default 0: the given order)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise PlacementSearchError(f"{ckpt}: not a checkpoint directory (no config.json)")
    if args.batch_size < 1:
        raise PlacementSearchError(f"--batch-size must be >= 1, got {args.batch_size}")
    from placement_search.evaluators.campaign import Campaign, resolve_tasks, sample_placements
    from placement_search.files import load_json
    from placement_search.placement import load_placements
    from placement_search.spec import ModelSpec

    resolve_tasks(args.tasks)  # fail fast on a bad task directory, before loading anything
    space = ModelSpec.from_config(load_json(ckpt / "config.json"), name=ckpt.name).search_space
    if args.placements:
        placements = load_placements(args.placements, space)
    else:
        placements = sample_placements(space, args.sample, args.seed)
    if args.order_window < 0:
        raise PlacementSearchError(f"--order-window must be >= 0, got {args.order_window}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise PlacementSearchError(f"--max-minutes must be > 0, got {args.max_minutes}")
    share = {"auto": None, "yes": True, "no": False}[args.share_contexts]
    graphs = {"auto": None, "yes": True, "no": False}[args.cuda_graphs]
    campaign = Campaign(ckpt, args.tasks, args.db, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        max_length=args.max_length, share_contexts=share, cuda_graphs=graphs)  # fmt: skip
    summary = campaign.run(placements, progress=not args.quiet, order_window=args.order_window,
                           max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)  # fmt: skip
    left = f", {summary.left} left for a rerun" if summary.left else ""
    rate = f" ({summary.placements_per_second:.2f}/s)" if summary.evaluated else ""
    sys.stdout.write(
        f"evaluated {summary.evaluated} placements ({summary.skipped} already done{left}) in {summary.seconds:.1f} s"
        f"{rate}, {summary.scored_tokens_per_placement} scored tokens each -> {args.db}\n"
    )
    return 0
