#!/usr/bin/env python3
"""Cost-model accuracy: predicted vs measured whole-model decode step time of random placements.

The measured placements (``measure_decode.py``, section ``validation``: uniform, skewed mixer counts and a
single layer of some mixer; the full supernet resident, one CUDA graph per step) at 16K and 32K under
``fixed:16`` and ``max_fit`` (115 GiB budget) are predicted by three variants:

- ``table``: the per-block cost table (``evaluators/cost_model.py``); targets: median |error| <= 3%, max <= 8%;
- ``idealized``: one constant per mixer (the paper's idealized speed);
- ``regression``: step time linear in mixer counts, fitted per condition, evaluated leave-one-out (each
  placement predicted by a fit to the others, so no placement predicts itself).

The table is also compared with the thin-model all-X and mixed steps of the engine-efficiency section, and the
``max_fit`` batch the table's memory model gives is checked against the batch that was measured.

Usage: python benchmarks/cost_model_accuracy.py [--raw results/decode_measurements_h200.json]
           [--table results/cost_tables/super-apriel-15b_h200.json] [--out results]
       python benchmarks/cost_model_accuracy.py --measure   (GPU: runs the validation section first)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_common import RAW_NAME, run_measure_decode, tiny_spec  # noqa: E402

from placement_search.evaluators.cost_model import CostModelError, CostTable, fit_regression  # noqa: E402
from placement_search.evaluators.memory import GiB, max_batch  # noqa: E402
from placement_search.files import write_json_atomic  # noqa: E402
from placement_search.placement import Placement  # noqa: E402
from placement_search.presets import BatchPolicy  # noqa: E402
from placement_search.spec import ModelSpec, get_spec  # noqa: E402

OUT_NAME = "cost_model_accuracy_h200.json"
TARGET_MEDIAN = 0.03
TARGET_MAX = 0.08


def _summary(errors: list[float]) -> dict[str, Any]:
    if not errors:
        return {"n": 0}
    a = [abs(e) for e in errors]
    return {"n": len(a), "median_abs": median(a), "max_abs": max(a), "mean": sum(errors) / len(errors)}


def analyze(raw: dict[str, Any], table: CostTable, spec: ModelSpec) -> dict[str, Any]:
    """Per-placement predictions and error summaries of the three variants."""
    val = [r for r in raw.get("whole") or [] if r.get("tag") == "validation"]
    groups: dict[tuple[int, str, float], list[dict[str, Any]]] = {}
    for r in val:
        groups.setdefault((int(r["context"]), str(r["policy"]), float(r["memory_budget_gib"])), []).append(r)
    rows = []
    for (c, pol, budget), items in sorted(groups.items()):
        policy = BatchPolicy.parse(pol)
        counts = [
            {m: Placement.parse(r["placement"], spec.search_space).mixers.count(m) for m in spec.mixer_names}
            for r in items
        ]
        for i, r in enumerate(items):
            p = Placement.parse(r["placement"], spec.search_space)
            b = int(r["batch"])
            row: dict[str, Any] = {
                "placement": r["placement"], "kind": r.get("kind"), "context": c, "policy": pol,
                "memory_budget_gib": budget, "batch": b, "measured_ms": r["step_ms"],
                "measured_tokens_per_s": r["tokens_per_s"],
            }  # fmt: skip
            if policy.kind == "max_fit":
                row["policy_batch"] = max_batch(spec, p.mixers, c, budget * GiB, overheads=table.overheads)
            try:
                row["table_ms"] = table.step_ms(p.mixers, c, b)
            except CostModelError as e:
                row["table_error"] = str(e)
            if table.idealized is not None:
                row["idealized_ms"] = table.idealized_step_ms(p.mixers)
            others = [(counts[j], float(items[j]["step_ms"])) for j in range(len(items)) if j != i]
            if len(others) >= len(spec.mixer_names):
                coef, _ = fit_regression(others, spec.mixer_names)
                row["regression_loo_ms"] = sum(coef[m] * n for m, n in counts[i].items())
            for v in ("table", "idealized", "regression_loo"):
                if f"{v}_ms" in row:
                    row[f"{v}_err"] = row[f"{v}_ms"] / row["measured_ms"] - 1
            rows.append(row)
    summary: dict[str, Any] = {}
    for v in ("table", "idealized", "regression_loo"):
        errs = [r[f"{v}_err"] for r in rows if f"{v}_err" in r]
        summary[v] = _summary(errs)
        summary[v]["by_condition"] = {
            f"{c}/{pol}": _summary([r[f"{v}_err"] for r in rows if f"{v}_err" in r
                                    and r["context"] == c and r["policy"] == pol])
            for c, pol in sorted({(r["context"], r["policy"]) for r in rows})
        }  # fmt: skip
    t = summary["table"]
    verdict = None
    if t.get("n"):
        verdict = {
            "median_abs_target": TARGET_MEDIAN,
            "max_abs_target": TARGET_MAX,
            "median_met": t["median_abs"] <= TARGET_MEDIAN,
            "max_met": t["max_abs"] <= TARGET_MAX,
        }
    engine = []
    for r in raw.get("whole") or []:
        if r.get("tag") != "engine":
            continue
        p = Placement.parse(r["placement"], spec.search_space)
        try:
            pred = table.step_ms(p.mixers, int(r["context"]), int(r["batch"]))
            engine.append({"label": r.get("label"), "batch": r["batch"], "context": r["context"],
                           "measured_ms": r["step_ms"], "table_ms": pred, "err": pred / r["step_ms"] - 1})
        except CostModelError as e:
            engine.append({"label": r.get("label"), "batch": r["batch"], "error": str(e)})
    batch_mismatch = [r for r in rows if "policy_batch" in r and r["policy_batch"] != r["batch"]]
    return {
        "rows": rows,
        "summary": summary,
        "targets_table": verdict,
        "engine_placements": engine,
        "max_fit_batch_mismatches": len(batch_mismatch),
        "n_placements": len({r["placement"] for r in rows}),
    }


def print_report(res: dict[str, Any]) -> None:
    print(f"\nCost-model accuracy: {res['n_placements']} placements, {len(res['rows'])} measured steps")
    print(f"{'condition':>24} {'variant':>15} {'n':>3} {'median|err|':>12} {'max|err|':>9} {'mean err':>9}")
    for v, s in res["summary"].items():
        for cond, cs in s.get("by_condition", {}).items():
            if cs.get("n"):
                print(f"{cond:>24} {v:>15} {cs['n']:>3} {100 * cs['median_abs']:>11.2f}% "
                      f"{100 * cs['max_abs']:>8.2f}% {100 * cs['mean']:>8.2f}%")
        if s.get("n"):
            print(f"{'ALL':>24} {v:>15} {s['n']:>3} {100 * s['median_abs']:>11.2f}% {100 * s['max_abs']:>8.2f}% "
                  f"{100 * s['mean']:>8.2f}%")
    t = res["targets_table"]
    if t:
        print(f"table targets: median <= {t['median_abs_target']:.0%}: {'MET' if t['median_met'] else 'MISSED'}; "
              f"max <= {t['max_abs_target']:.0%}: {'MET' if t['max_met'] else 'MISSED'}")
    worst = sorted((r for r in res["rows"] if "table_err" in r), key=lambda r: -abs(r["table_err"]))[:5]
    for r in worst:
        print(f"  worst: {r['placement']} {r['kind']:>7} L={r['context']} {r['policy']:>9} B={r['batch']:>4}: "
              f"measured {r['measured_ms']:.3f} ms, table {r['table_ms']:.3f} ms ({100 * r['table_err']:+.2f}%)")
    for e in res["engine_placements"]:
        if "err" in e:
            print(f"  thin {e['label']:>20} B={e['batch']:>5} L={e['context']}: measured {e['measured_ms']:.3f} ms, "
                  f"table {e['table_ms']:.3f} ms ({100 * e['err']:+.2f}%)")
    if res["max_fit_batch_mismatches"]:
        print(f"  note: {res['max_fit_batch_mismatches']} max_fit batches differ from the table's memory model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Cost-model accuracy (from raw measurements and a cost table).")
    ap.add_argument("--raw", default="results/decode_measurements_h200.json")
    ap.add_argument("--table", default="results/cost_tables/super-apriel-15b_h200.json")
    ap.add_argument("--out", default="results")
    ap.add_argument("--out-name", default=OUT_NAME)
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--measure", action="store_true", help="run the GPU validation section first")
    args = ap.parse_args(argv)
    if args.measure:
        run_measure_decode(["--sections", "validation", "--out", args.out, "--no-build",
                             *(["--device", "cpu", "--tiny"] if args.tiny else [])])
        args.raw = str(Path(args.out) / RAW_NAME)
    raw = json.loads(Path(args.raw).read_text())
    table = CostTable.load(args.table)
    if args.tiny or raw["meta"].get("model") == "tiny-apriel":
        spec = tiny_spec()
    else:
        spec = get_spec(raw["meta"].get("model", "super-apriel-15b"))
    table.check_spec(spec)
    res = analyze(raw, table, spec)
    res["meta"] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "raw": args.raw,
        "table": args.table,
        "measured": {k: raw["meta"].get(k) for k in ("date", "gpu", "torch", "cuda", "triton", "fla", "python",
                                                       "host", "command")},
    }
    print_report(res)
    path = write_json_atomic(Path(args.out) / args.out_name, res)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
