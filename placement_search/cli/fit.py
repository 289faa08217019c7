"""``placement-search fit``: fit a surrogate on an evaluation table, validate it, optionally save it.

Thin: the work is in :mod:`placement_search.surrogate` (``table``, ``registry``, ``validation``,
``tuning``, ``persistence``). Prints the validation table (k-fold, plus out-of-distribution splits
when the table has a ``sampler`` column with ``uniform`` rows and others). Speed buckets come from a
speed column, or with ``--cost-table`` from the decode throughput a measured cost table predicts at
``--context`` under ``--batch-policy``, else from the attention-layer count (a proxy).
"""

from __future__ import annotations

import argparse
import sys

from placement_search.errors import PlacementSearchError

DESCRIPTION = (
    "Fit a surrogate of placement quality on an evaluation table (columns: placement, the target, "
    "optional sampler and speed), print k-fold and out-of-distribution validation "
    "(R², Spearman, Kendall, precision@top-k per speed bucket), and save it with --out."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``fit`` verb on the CLI's subparsers."""
    from placement_search.spec import DEFAULT_SPEC
    from placement_search.surrogate.registry import SURROGATE_NAMES

    p = sub.add_parser("fit", help="fit and validate a surrogate of placement quality", description=DESCRIPTION)
    p.add_argument("table", help="evaluation table (.csv, .tsv, or .parquet with pyarrow)")
    p.add_argument("--model", default=DEFAULT_SPEC, help=f"model spec name or config.json path (default {DEFAULT_SPEC})")
    p.add_argument("--target", default="score", help="target column (default score)")
    p.add_argument("--placement-column", default="placement", help="placement column (default placement)")
    p.add_argument("--sampler-column", default="sampler", help="sampler tag column for OOD splits (default sampler)")
    p.add_argument(
        "--speed-column",
        default=None,
        help="speed column for the speed buckets (default: 'speed' if present, else minus the attention-layer count)",
    )
    p.add_argument(
        "--cost-table",
        default=None,
        metavar="PATH",
        help="cost table JSON (e.g. results/cost_tables/super-apriel-15b_h200.json): speed buckets from each "
        "placement's predicted decode throughput instead of a speed column or the attention-count proxy",
    )
    p.add_argument("--context", type=int, default=32768, help="context length for --cost-table (default 32768)")
    p.add_argument(
        "--batch-policy", default="max_fit", help="batch policy for --cost-table: max_fit, max_fit:CAP or fixed:B"
    )
    p.add_argument(
        "--memory-gib", type=float, default=None, help="memory budget for --cost-table (default: the table's GPU)"
    )
    p.add_argument(
        "--covariance",
        choices=("design", "float32", "float64", "none"),
        default="design",
        help="how --out stores a linear/cluster posterior covariance: design (default; exact, small), "
        "float32, float64 (dense) or none (no return_std after loading)",
    )
    p.add_argument(
        "--surrogate", default="xgb", metavar="NAME", help=f"surrogate: {', '.join(SURROGATE_NAMES)} (default xgb)"
    )
    p.add_argument("--cv", type=int, default=5, help="k-fold splits (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--buckets", type=int, default=4, help="speed buckets (default 4)")
    p.add_argument("--top-frac", type=float, default=0.1, help="top fraction for precision@top-k (default 0.1)")
    p.add_argument("--tune", action="store_true", help="tune hyperparameters with Optuna (nested CV)")
    p.add_argument("--trials", type=int, default=20, help="Optuna trials per tuning (default 20)")
    p.add_argument("--inner-cv", type=int, default=3, help="inner CV folds when tuning (default 3)")
    p.add_argument("--calibration", action="store_true", help="also report k-fold interval coverage")
    p.add_argument("--out", default=None, help="save the surrogate fitted on all rows to this folder")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``fit``; user errors raise :class:`PlacementSearchError` (exit 2 in the CLI)."""
    import pandas as pd

    from placement_search.spec import get_spec
    from placement_search.surrogate import persistence, registry, table, workflow

    if args.trials < 1:
        raise PlacementSearchError(f"--trials must be at least 1, got {args.trials}")
    registry.make_surrogate(args.surrogate, args.seed)  # fail fast on an unknown name
    if args.cost_table and args.speed_column:
        raise PlacementSearchError("give --speed-column or --cost-table, not both")
    spec = get_spec(args.model)
    space = spec.search_space
    frame = table.read_table(args.table)
    speed_column = None if args.cost_table else args.speed_column or ("speed" if "speed" in frame.columns else None)
    data = table.load_evaluation_table(
        frame,
        space,
        target=args.target,
        placement_column=args.placement_column,
        sampler_column=args.sampler_column,
        speed_column=speed_column,
        source=str(args.table),
    )
    if len(data) < max(args.cv, 2):
        raise PlacementSearchError(f"{args.table}: {len(data)} rows, fewer than the {args.cv} CV folds")
    source = f"column {speed_column!r}" if speed_column else "the attention-layer count (proxy)"
    if args.cost_table:
        cost = table.cost_table_speed(
            data.placements,
            args.cost_table,
            spec=spec,
            context=args.context,
            batch_policy=args.batch_policy,
            memory_gib=args.memory_gib,
        )
        data.speed, source = cost.speed, cost.describe()
    if not args.quiet:
        print(f"{args.table}: {len(data)} placements, target {args.target!r}, speed buckets from {source}",
              file=sys.stderr)
    report = workflow.fit_and_validate(
        data,
        args.surrogate,
        cv=args.cv,
        seed=args.seed,
        n_buckets=args.buckets,
        top_frac=args.top_frac,
        tune=args.tune,
        n_trials=args.trials,
        inner_cv=args.inner_cv,
        calibration=args.calibration,
    )
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(report.summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if report.calibration is not None:
        cover = report.calibration.groupby("level")["coverage"].mean()
        print("interval coverage (k-fold): " + ", ".join(f"{lv:.0%} -> {c:.1%}" for lv, c in cover.items()))
    if report.tuned_params is not None and not args.quiet:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.tuned_params.items())
        print(f"tuned parameters (all rows): {params}", file=sys.stderr)
    if args.out:
        path = persistence.save_surrogate(
            report.model,
            args.out,
            X=data.placements,
            y=data.y,
            metrics={"summary": report.summary, "calibration": report.calibration, "cv": args.cv,
                     "seed": args.seed, "tuned_params": report.tuned_params},
            space=space,
            covariance=args.covariance,
            extra={
                "table": str(args.table),
                "table_sha256": table.file_sha256(args.table),
                "target": args.target,
                "surrogate": args.surrogate,
                "model_spec": args.model,
                "speed_buckets": source,
            },
        )
        if not args.quiet:
            print(f"saved {args.surrogate} surrogate to {path}", file=sys.stderr)
    return 0
