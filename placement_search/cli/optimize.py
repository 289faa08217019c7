"""``placement-search optimize``: the front and serving presets from an evaluation table.

Thin: the work is in :func:`placement_search.optimize.optimize`. Without ``--evaluations`` it runs on
the shipped dev-supernet evaluations (:data:`placement_search.optimize.DEFAULT_EVALUATIONS`) when they
exist, and otherwise exits 2 saying so.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "Fit a surrogate of placement quality on an evaluation table, search the (quality, decode throughput) "
    "front with an Optuna study (NSGA-II by default) or the exact DP, print the front and the presets at "
    "speed levels over all-attention, and write presets.json, front.csv and front.png."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``optimize`` verb on the CLI's subparsers."""
    from placement_search.optimize import DEFAULT_EVALUATIONS, DEFAULT_SURROGATE, DEFAULT_TRIALS, SOLVERS
    from placement_search.search import SAMPLERS

    p = sub.add_parser("optimize", help="search the speed/quality front and write presets", description=DESCRIPTION)
    p.add_argument(
        "--evaluations",
        default=None,
        metavar="TABLE",
        help=f"evaluation table (.csv/.tsv/.parquet; default: the shipped {DEFAULT_EVALUATIONS})",
    )
    p.add_argument("--target", default="score", help="quality column (default score)")
    p.add_argument("--model", default=None, help="model spec name or config.json (default: the built-in spec)")
    p.add_argument("--cost-table", default=None, metavar="PATH", help="cost table JSON (default: the shipped H200 table)")
    p.add_argument("--context", type=int, default=32768, help="context length in tokens (default 32768)")
    p.add_argument("--batch-policy", default="max_fit", help="max_fit, max_fit:CAP or fixed:B (default max_fit)")
    p.add_argument("--memory-gib", type=float, default=None, help="memory budget (default: the table's GPU)")
    p.add_argument("--levels", default="1.5,2,3,5,7,10", help="speed-up levels (default 1.5,2,3,5,7,10)")
    p.add_argument(
        "--constraint",
        action="append",
        default=[],
        metavar="C",
        help="NAME>=K, NAME<=K, NAME==K, LAYER=NAME (pin) or LAYER!=NAME (forbid); repeatable",
    )
    p.add_argument("--no-single", default="", metavar="MIXERS",
                   help="comma-separated mixers never used on exactly one layer")
    p.add_argument("--surrogate", default=DEFAULT_SURROGATE,
                   help=f"surrogate name (default {DEFAULT_SURROGATE}; see placement-search fit)")
    p.add_argument("--sampler", choices=SAMPLERS, default="nsga2", help="Optuna sampler (default nsga2)")
    p.add_argument("--solver", choices=SOLVERS, default="search",
                   help="search (Optuna study) or dp (exact; linear/cluster surrogates)")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"trials (default {DEFAULT_TRIALS})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="out/optimize", help="output folder (default out/optimize)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (resumable; with --study-name)")
    p.add_argument("--study-name", default=None, help="study name in --storage")
    p.add_argument("--quiet", action="store_true", help="print only the presets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``optimize``; user errors raise :class:`PlacementSearchError` (exit 2 in the CLI)."""
    import pandas as pd

    from placement_search.errors import PlacementSearchError
    from placement_search.optimize import optimize

    if (args.storage is None) != (args.study_name is None):
        raise PlacementSearchError("give --storage and --study-name together")
    result = optimize(
        args.evaluations,
        target=args.target,
        model=args.model,
        cost_table=args.cost_table,
        context=args.context,
        batch_policy=args.batch_policy,
        memory_gib=args.memory_gib,
        levels=args.levels,
        constraints=args.constraint,
        no_single=[m for m in args.no_single.split(",") if m.strip()],
        surrogate=args.surrogate,
        sampler=args.sampler,
        solver=args.solver,
        trials=args.trials,
        seed=args.seed,
        out=args.out,
        storage=args.storage,
        study_name=args.study_name,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    fmt = {"float_format": lambda v: f"{v:.4g}"}
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60):
        if not args.quiet:
            cols = ["placement", "quality", "quality_std", "tokens_per_s", "speedup"]
            print(f"front ({len(result.front)} placements):")
            print(result.front[cols].to_string(index=False, **fmt))
            print()
        cols = ["level", "placement", "quality", "quality_std", "speedup", "tokens_per_s"]
        print("presets:")
        print(result.presets[cols].to_string(index=False, **fmt))
    if not args.quiet:
        for note in result.notes:
            print(note, file=sys.stderr)
        print(
            f"{result.solver}: {result.trials} trials, hypervolume {result.hypervolume:.6g}, {result.seconds:.1f} s; "
            f"wrote {', '.join(str(p) for p in result.paths.values())}",
            file=sys.stderr,
        )
    return 0
