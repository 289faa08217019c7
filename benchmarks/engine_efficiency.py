#!/usr/bin/env python3
"""Engine efficiency of whole-model decode: bytes a step must move over its time, vs copy bandwidth.

For all-attention, all-SWA, all-GDN, all-KDA and a mixed placement at batch 1, 16 and the largest batch that
fits (thin model, one CUDA graph per step, context 32K), from the raw measurements of ``measure_decode.py``:

- bytes moved per step = weights read (embedding: only the looked-up rows) + caches read and written +
  logits written (:func:`~placement_search.evaluators.memory.decode_step_bytes`), over the step time, as a
  fraction of the device-to-device copy bandwidth measured in the same run (read + write);
  target >= 90% at batch >= 16 where the step is memory-bound;
- batch 1: step time over the weight-read time (weight bytes / copy bandwidth); target <= 1.25x.

Also each mixer's own decode cost (block minus shared part, from the cost-table pieces) and each decode kernel
alone (``decode_common.measure_kernels``, run by ``measure_decode.py``) against its memory roofline.

Usage: python benchmarks/engine_efficiency.py [--raw results/decode_measurements_h200.json] [--out results]
       python benchmarks/engine_efficiency.py --measure   (GPU: runs the measurement sections first)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_common import RAW_NAME, run_measure_decode, tiny_spec  # noqa: E402

from placement_search.evaluators.memory import decode_step_bytes, mixer_cache_bytes  # noqa: E402
from placement_search.files import write_json_atomic  # noqa: E402
from placement_search.placement import Placement  # noqa: E402
from placement_search.spec import ModelSpec, get_spec  # noqa: E402

OUT_NAME = "engine_efficiency_h200.json"
#: Names ``decode_common.measure_kernels`` gave its rows before they were made explicit (the rows time fla's delta-rule
#: kernels alone, the baseline of the runtime's fused decode kernels, not the runtime's path).
KERNEL_LABELS = {
    "gdn step (runtime: new state + copy)": "gdn delta rule (fla fused_recurrent: new state + copy)",
    "gdn step (same kernel, in place)": "gdn delta rule (fla kernel, state in place)",
    "kda step (fla, in place)": "kda delta rule (fla kernel, state in place)",
    "attention decode 32K (runtime: mask)": "attention decode 32K (SDPA, validity mask)",
}
TARGET_BW_FRACTION = 0.90
TARGET_BATCH1_RATIO = 1.25


def _flops(spec: ModelSpec, mixers: list[str], context: int, batch: int) -> float:
    """Matmul FLOPs of a decode step (2 per weight per token, plus attention's 4*H*D per key)."""
    d = spec.hidden_size
    params = spec.placement_params(mixers) - spec.vocab_size * d  # the embedding is a lookup
    flops = 2.0 * params * batch
    for i, m in enumerate(mixers):
        ms = spec.mixer(i, m)
        if ms.kind == "attention":
            keys = context if ms.window_size is None else min(ms.window_size, context)
            flops += 4.0 * ms.heads * ms.head_size * keys * batch
    return flops


def analyze(raw: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Engine-efficiency rows and target verdicts from raw measurements."""
    ceil = raw.get("ceilings") or {}
    ceil_copy = copy_gbps = float(ceil.get("copy_gbps") or 0.0)
    tflops = float(ceil.get("matmul_tflops") or 0.0)
    rows = []
    for r in raw.get("whole") or []:
        if r.get("tag") != "engine":
            continue
        p = Placement.parse(r["placement"], spec.search_space)
        b, c = int(r["batch"]), int(r["context"])
        nbytes = decode_step_bytes(spec, p.mixers, c, b)
        step_s = float(r["step_ms"]) / 1e3
        copy_gbps = float(r.get("copy_gbps") or ceil_copy)  # the bandwidth of the row's own run
        gbps = nbytes["total"] / step_s / 1e9
        t_mem = nbytes["total"] / (copy_gbps * 1e9) if copy_gbps else float("nan")
        t_flop = _flops(spec, list(p.mixers), c, b) / (tflops * 1e12) if tflops else 0.0
        row = {
            "label": r.get("label"),
            "placement": r["placement"],
            "context": c,
            "batch": b,
            "step_ms": r["step_ms"],
            "tokens_per_s": r["tokens_per_s"],
            "bytes_gb": nbytes["total"] / 1e9,
            "weights_gb": nbytes["weights"] / 1e9,
            "cache_gb": nbytes["cache"] / 1e9,
            "achieved_gbps": gbps,
            "fraction_of_copy": gbps / copy_gbps if copy_gbps else None,
            "memory_bound": t_mem >= t_flop,
            "floor_ms": max(t_mem, t_flop) * 1e3,
            # the step's phases run one after another: the projections read the weights at a compute-bound rate
            # once B is past the matmul/bandwidth crossover, the state and cache traffic is memory-bound; a step
            # cannot beat the sum of the two phases' own floors
            "phase_floor_ms": (max(nbytes["weights"] / (copy_gbps * 1e9), t_flop) + nbytes["cache"] / (copy_gbps * 1e9))
            * 1e3 if copy_gbps else None,
            "copy_gbps": copy_gbps,
            "run": r.get("run"),
        }
        if b == 1 and copy_gbps:
            t_w = nbytes["weights"] / (copy_gbps * 1e9)
            row["weight_read_ms"] = t_w * 1e3
            row["batch1_ratio"] = step_s / t_w
            row["target_met"] = row["batch1_ratio"] <= TARGET_BATCH1_RATIO
            row["target"] = f"step <= {TARGET_BATCH1_RATIO}x weight-read time"
        elif b >= 16 and copy_gbps:
            if row["memory_bound"]:
                row["target_met"] = row["fraction_of_copy"] >= TARGET_BW_FRACTION
                row["target"] = f">= {TARGET_BW_FRACTION:.0%} of copy bandwidth"
            else:
                row["target_met"] = None
                row["target"] = "compute-bound: bandwidth target does not apply"
        rows.append(row)
    copy_gbps = ceil_copy
    mixer_rows = []
    pieces = raw.get("pieces") or []
    shared = {r["batch"]: r["ms"] for r in pieces if r["kind"] == "shared"}
    d = spec.hidden_size
    for r in pieces:
        if r["kind"] != "layer" or r["batch"] not in shared:
            continue
        m = spec.mixer(0, r["mixer"])
        cache = mixer_cache_bytes(m, r["context"])
        # attention reads every slot and writes one; GDN/KDA read and write their states
        moved = cache + 2 * m.head_groups * m.head_size * 2 if m.kind == "attention" else 2 * cache
        nbytes = m.num_params(d) * 2 + r["batch"] * moved
        mix_ms = r["ms"] - shared[r["batch"]]
        mixer_rows.append({
            "mixer": r["mixer"], "context": r["context"], "batch": r["batch"], "mixer_ms": mix_ms,
            "bytes_mb": nbytes / 1e6, "achieved_gbps": nbytes / (mix_ms / 1e3) / 1e9 if mix_ms > 0 else None,
            "fraction_of_copy": (nbytes / (mix_ms / 1e3) / 1e9) / copy_gbps if copy_gbps and mix_ms > 0 else None,
        })  # fmt: skip
    kernels = []
    for k in raw.get("kernels") or []:
        k = dict(k)
        k["kernel"] = KERNEL_LABELS.get(k["kernel"], k["kernel"])
        kc = float(k.get("copy_gbps") or ceil_copy)
        if kc and "gbps" in k:
            k["fraction_of_copy"] = k["gbps"] / kc
        kernels.append(k)
    return {
        "copy_gbps": copy_gbps,
        "matmul_tflops": tflops,
        "targets": {"bandwidth_fraction_at_batch_ge_16": TARGET_BW_FRACTION, "batch1_ratio": TARGET_BATCH1_RATIO},
        "rows": rows,
        "mixers": mixer_rows,
        "kernels": kernels,
    }


def print_report(res: dict[str, Any]) -> None:
    print(f"\nEngine efficiency (copy bandwidth {res['copy_gbps']:.0f} GB/s read+write, "
          f"matmul {res['matmul_tflops']:.0f} TFLOP/s)")
    print(f"{'placement':>16} {'ctx':>6} {'B':>5} {'step ms':>9} {'tok/s':>10} {'GB moved':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'floor ms':>9} {'phases ms':>9}  target")
    for r in res["rows"]:
        frac = r["fraction_of_copy"]
        verdict = ""
        if "target_met" in r:
            met = r["target_met"]
            verdict = ("n/a " if met is None else "MET " if met else "MISS ") + r["target"]
            if "batch1_ratio" in r:
                verdict += f" ({r['batch1_ratio']:.2f}x, weight read {r['weight_read_ms']:.2f} ms)"
        print(f"{r['label'] or r['placement'][:16]:>16} {r['context']:>6} {r['batch']:>5} {r['step_ms']:>9.3f} {r['tokens_per_s']:>10.1f} "
              f"{r['bytes_gb']:>9.2f} {r['achieved_gbps']:>7.0f} {100 * (frac or 0):>5.1f}% {r['floor_ms']:>9.3f} "
              f"{r.get('phase_floor_ms') or float('nan'):>9.3f}  {verdict}")
    if res["kernels"]:
        print("\nDecode kernels alone (essential bytes / time)")
        for k in res["kernels"]:
            if "error" in k:
                print(f"{k['kernel']:>56} B={k['batch']:>5}: error {k['error']}")
                continue
            extra = ""
            if "rel_err_state" in k:
                extra = f"  (vs fla's public call: rel err o {k['rel_err_o']:.1e}, state {k['rel_err_state']:.1e})"
            print(f"{k['kernel']:>56} B={k['batch']:>5}: {k['us']:9.1f} us {k['gbps']:7.0f} GB/s "
                  f"{100 * k.get('fraction_of_copy', 0):5.1f}% of copy{extra}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Engine efficiency of whole-model decode (from raw measurements).")
    ap.add_argument("--raw", default="results/decode_measurements_h200.json")
    ap.add_argument("--out", default="results")
    ap.add_argument("--out-name", default=OUT_NAME)
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--measure", action="store_true", help="run the GPU sections (ceilings, kernels, thin) first")
    args = ap.parse_args(argv)
    if args.measure:
        run_measure_decode(["--sections", "ceilings,kernels,thin", "--out", args.out, "--no-build",
                             *(["--device", "cpu", "--tiny"] if args.tiny else [])])
        args.raw = str(Path(args.out) / RAW_NAME)
    raw = json.loads(Path(args.raw).read_text())
    if args.tiny or raw["meta"].get("model") == "tiny-apriel":
        spec = tiny_spec()
    else:
        spec = get_spec(raw["meta"].get("model", "super-apriel-15b"))
    res = analyze(raw, spec)
    res["meta"] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "raw": args.raw,
        "measured": {k: raw["meta"].get(k) for k in ("date", "gpu", "torch", "cuda", "triton", "fla", "python",
                                                       "host", "command")},
    }
    print_report(res)
    path = write_json_atomic(Path(args.out) / args.out_name, res)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
