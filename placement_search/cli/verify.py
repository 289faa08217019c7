"""``placement-search verify``: measure presets, report predicted vs measured, and optionally refit.

Thin: the work is in :func:`placement_search.verify.verify_presets` (and :func:`placement_search.optimize.optimize`
for ``--refit``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from placement_search.errors import PlacementSearchError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify",
        help="measure presets (quality on a checkpoint, optionally GPU throughput) against their predictions",
        description="Score a preset file's placements (and all-attention, the reference) on a supernet checkpoint and "
        "task pack, optionally measure their decode throughput on the local GPU under each preset's conditions, "
        "print predicted vs measured, write presets.verified.json and verify.csv, and add the measurements to the "
        "evaluation table (--evaluations) for a refit (--refit).",
    )
    p.add_argument("presets", help="preset file (placement-search optimize writes presets.json)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="supernet checkpoint (Apriel2, with tokenizer)")
    p.add_argument("--tasks", required=True, metavar="DIR", help="task pack directory (or lm-eval task names)")
    p.add_argument("--out", default="out/verify", help="output folder (default out/verify)")
    p.add_argument("--db", default=None, metavar="FILE", help="results database (default OUT/verify.sqlite)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward (default 16)")
    p.add_argument("--measure-throughput", action="store_true", help="also measure decode throughput on the GPU")
    p.add_argument("--evaluations", default=None, metavar="TABLE", help="evaluation table to extend with the results")
    p.add_argument("--target", default="score", help="quality column of the table (default score)")
    p.add_argument("--refit", action="store_true", help="then run optimize on the extended table (needs --evaluations)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.refit and not args.evaluations:
        raise PlacementSearchError("--refit needs --evaluations (the table to extend and refit on)")
    if args.measure_throughput:
        import torch

        if not torch.cuda.is_available():
            raise PlacementSearchError("--measure-throughput needs a CUDA GPU and torch sees none")
    from placement_search.verify import verify_presets

    res = verify_presets(args.presets, args.checkpoint, args.tasks, out=args.out, db=args.db, device=args.device,
                         dtype=args.dtype, batch_size=args.batch_size, measure_throughput=args.measure_throughput,
                         evaluations=args.evaluations, target=args.target, progress=not args.quiet)  # fmt: skip
    shown = res.report[["preset", "placement", "predicted_quality", "predicted_std", "measured_quality", "z",
                        "predicted_tokens_per_s", "measured_tokens_per_s"]].copy()  # fmt: skip
    shown["placement"] = shown.placement.str.slice(0, 12) + "..."
    sys.stdout.write(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n")
    for note in res.notes:
        sys.stdout.write(f"note: {note}\n")
    for key, path in res.paths.items():
        sys.stdout.write(f"{key}: {path}\n")
    if args.refit:
        from placement_search.optimize import optimize
        from placement_search.presets import read_presets

        pf = read_presets(args.presets)
        cond = next((p.conditions for p in pf.presets if p.conditions is not None), None)
        levels = sorted({p.speed_level for p in pf.presets if p.speed_level}) or None
        kwargs = {} if cond is None else {
            "context": cond.context_length, "batch_policy": policy_text(cond.batch_policy),
            "memory_gib": cond.memory_budget_gib,
        }  # fmt: skip
        refit = optimize(res.paths["evaluations"], target=args.target, model=pf.model_name,
                         out=Path(args.out) / "refit", progress=not args.quiet,
                         **({"levels": levels} if levels else {}), **kwargs)  # fmt: skip
        sys.stdout.write(f"refit on {len(res.report)} new measurements: presets in {refit.paths['presets']}\n")
    return 0


def policy_text(policy: object) -> str:
    """``max_fit``, ``max_fit:CAP`` or ``fixed:B`` of a :class:`~placement_search.presets.BatchPolicy`."""
    kind, batch, cap = policy.kind, policy.batch, policy.cap  # type: ignore[attr-defined]
    if kind == "fixed":
        return f"fixed:{batch}"
    return f"max_fit:{cap}" if cap else "max_fit"
