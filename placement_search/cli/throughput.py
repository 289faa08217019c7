"""``placement-search throughput``: decode throughput of a placement, predicted from a cost table or measured.

Predicting needs no GPU: a measured cost table (default: the shipped H200 table of the model) gives the step
time, the memory model the batch of the policy. ``--measure`` builds a thin random model of the placement on
the local GPU and times its decode step in one CUDA graph instead.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from placement_search.errors import PlacementSearchError
from placement_search.spec import DEFAULT_SPEC

#: Where the shipped cost tables live (repo checkout); ``PLACEMENT_SEARCH_COST_TABLE`` overrides the default.
TABLES_DIR = Path(__file__).resolve().parents[2] / "results" / "cost_tables"
DEFAULT_GPU_TAG = "h200"


def default_table(model: str) -> Path:
    """The cost table used when ``--table`` is not given."""
    env = os.environ.get("PLACEMENT_SEARCH_COST_TABLE")
    if env:
        return Path(env)
    return TABLES_DIR / f"{Path(model).stem if os.sep in model else model}_{DEFAULT_GPU_TAG}.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "throughput",
        help="decode throughput of a placement (predicted from a cost table, or measured on the local GPU)",
        description="Decode throughput (tokens/s over the batch) of PLACEMENT at a context length under a "
        "batch policy: fixed:B, or max_fit[:CAP] (the largest batch the memory budget holds, optionally "
        "capped). Predicted from a measured cost table (default: the shipped table of the model), or "
        "measured on the local GPU with --measure.",
    )
    p.add_argument("placement", metavar="PLACEMENT", help="compact code (AAGK...), comma list, or a file")
    p.add_argument("--context", type=int, default=32768, help="context length in tokens (default 32768)")
    p.add_argument(
        "--batch-policy", default="max_fit", help="fixed:B, max_fit or max_fit:CAP (default max_fit)"
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="memory budget in GiB (default: the GPU's memory as recorded in the table, or the local GPU's)",
    )
    p.add_argument("--table", default=None, help="cost table JSON (default: the shipped table of the model)")
    p.add_argument("--model", default=None, help=f"built-in model or config.json (default {DEFAULT_SPEC})")
    p.add_argument(
        "--variant",
        choices=("table", "idealized", "regression"),
        default="table",
        help="cost model: per-layer table (default), idealized constants, or count regression",
    )
    p.add_argument("--measure", action="store_true", help="measure on the local GPU instead of predicting")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.context < 1:
        raise PlacementSearchError(f"--context must be a positive number of tokens, got {args.context}")
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise PlacementSearchError(f"--memory-gib must be positive, got {args.memory_gib:g}")


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """The prediction as a JSON-ready dict, plus its one-line summary under ``"summary"``."""
    from placement_search.evaluators.cost_model import CostTable
    from placement_search.presets import BatchPolicy
    from placement_search.spec import get_spec

    policy = BatchPolicy.parse(args.batch_policy)
    path = Path(args.table) if args.table else default_table(args.model or DEFAULT_SPEC)
    if not args.table and not path.exists():
        raise PlacementSearchError(f"no shipped cost table at {path}; give one with --table FILE")
    table = CostTable.load(path)
    spec = get_spec(args.model) if args.model else get_spec(table.model)
    pred = table.predict(args.placement, args.context, policy, args.memory_gib, variant=args.variant, spec=spec)
    out = pred.to_dict()
    out["table"] = str(path)
    out["summary"] = pred.summary()
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Measure on the local GPU (thin random model, one CUDA graph per step)."""
    try:
        import torch
    except ImportError:
        raise PlacementSearchError("--measure needs torch with CUDA (pip install 'placement-search[gpu]')") from None
    if not torch.cuda.is_available():
        raise PlacementSearchError("--measure needs a CUDA GPU and torch sees none; drop --measure to predict")
    from placement_search.evaluators.throughput import measure_throughput
    from placement_search.placement import Placement
    from placement_search.spec import get_spec

    spec = get_spec(args.model or DEFAULT_SPEC)
    res = measure_throughput(spec, args.placement, args.context, args.batch_policy, args.memory_gib)
    m = res["measurement"]
    p = Placement.parse(args.placement, spec.search_space)
    counts = {k: p.mixers.count(k) for k in spec.search_space.mixers}
    gpu = res["device"].get("gpu", "GPU")
    text = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
    summary = (
        f"{m.placement} ({text}): {m.tokens_per_s:,.1f} tokens/s at batch {m.batch}, step {m.step_ms:.3f} ms; "
        f"context {args.context}, {res['policy']}, {res['memory_budget_gib']:.1f} GiB, {gpu} [measured]"
    )
    from placement_search.presets import Conditions, Throughput

    return {
        "placement": m.placement,
        "counts": counts,
        "measured": True,
        "conditions": Conditions(args.context, res["policy"], gpu, round(res["memory_budget_gib"], 3)).to_dict(),
        "throughput": Throughput(
            tokens_per_s=round(m.tokens_per_s, 3), batch=m.batch, step_time_ms=round(m.step_ms, 4),
            source=f"measured on {gpu}, one CUDA graph per step, median of {m.replays} replays",
        ).to_dict(),
        "memory_gib": res["memory"].gib(),
        "device": res["device"],
        "summary": summary,
    }


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    out = measure(args) if args.measure else predict(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(out["summary"])
        mem = out["memory_gib"]
        print(
            f"memory: weights {mem['weights']:.2f} GiB + cache {mem['cache']:.2f} GiB "
            f"({mem['cache_per_sequence']:.3f} GiB/sequence) + workspace {mem['workspace']:.2f} GiB + reserve "
            f"{mem['reserve']:.2f} GiB = {mem['total']:.2f} GiB"
        )
    return 0
