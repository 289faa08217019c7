"""``placement-search fit``: fit a surrogate on an evaluation table, validate it, optionally save it.

Thin: the work is in :mod:`placement_search.surrogate` (``table``, ``registry``, ``validation``,
``tuning``, ``persistence``). Prints the validation table (k-fold, plus out-of-distribution splits
when the table has a ``sampler`` column with ``uniform`` rows and others).
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
    space = get_spec(args.model).search_space
    frame = table.read_table(args.table)
    speed_column = args.speed_column or ("speed" if "speed" in frame.columns else None)
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
    if not args.quiet:
        source = f"column {speed_column!r}" if speed_column else "the attention-layer count"
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
            extra={
                "table": str(args.table),
                "table_sha256": table.file_sha256(args.table),
                "target": args.target,
                "surrogate": args.surrogate,
                "model_spec": args.model,
            },
        )
        if not args.quiet:
            print(f"saved {args.surrogate} surrogate to {path}", file=sys.stderr)
    return 0
