#!/usr/bin/env python3
"""The Triton prefill conv (``causal_conv1d(backend="triton")``) against the torch path on the GPU: bitwise.

The two paths do the same fp32 arithmetic in the same order (``kernels/_conv_triton.py``), so on CUDA the outputs
and final states must be bitwise equal, not merely close: the evaluation campaigns' scores were produced with the
torch path, and the Triton path may replace it only if it reproduces them exactly. Inputs are fresh random tensors
(seeded from the clock unless ``--seed``) at the dev supernet's sizes (GDN conv over 256 channels, KDA over 128,
batch 128 x 511: the campaign's widest forward), at Super Apriel 15B sizes (6144 and 4096 channels), and edge
cases: T = 1, 2, 3 (< K-1), an initial state, a row-strided input (GDN's conv input is a slice of a wider
projection), no activation, fp32. Also times both paths (median of CUDA-event timings).

Usage: python benchmarks/check_conv_triton.py [--out results/conv_triton_check_h200.json] [--seed N]
Exit status 1 unless every case is bitwise equal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from placement_search.kernels.conv import causal_conv1d

# name: (B, T, C, dtype, initial state, strided input, activation)
CASES: dict[str, tuple[int, int, int, torch.dtype, bool, bool, str | None]] = {
    "devnet-gdn": (128, 511, 256, torch.bfloat16, False, True, "silu"),
    "devnet-kda": (128, 511, 128, torch.bfloat16, False, False, "silu"),
    "devnet-gdn-short": (15, 82, 256, torch.bfloat16, False, True, "silu"),
    "15b-gdn": (4, 2048, 6144, torch.bfloat16, False, True, "silu"),
    "15b-kda": (4, 2048, 4096, torch.bfloat16, True, False, "silu"),
    "state-t1": (8, 1, 256, torch.bfloat16, True, False, "silu"),
    "state-t2": (8, 2, 256, torch.bfloat16, True, True, "silu"),
    "state-t3": (8, 3, 200, torch.bfloat16, True, False, "silu"),
    "no-activation": (16, 300, 256, torch.bfloat16, True, False, None),
    "fp32": (16, 300, 256, torch.float32, True, True, "silu"),
    "fp16": (16, 300, 256, torch.float16, False, False, "silu"),
}


def timed_ms(fn: Any, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def run_case(B: int, T: int, C: int, dtype: torch.dtype, state: bool, strided: bool, act: str | None,
             gen: torch.Generator) -> dict[str, Any]:  # fmt: skip
    dev = torch.device("cuda")
    K = 4
    wide = torch.randn(B, T, C + (96 if strided else 0), device=dev, generator=gen).to(dtype)
    x = wide[:, :, 32 : 32 + C] if strided else wide
    w = (0.5 * torch.randn(C, K, device=dev, generator=gen)).to(dtype)
    st = torch.randn(B, C, K - 1, device=dev, generator=gen).to(dtype) if state else None
    y0, f0 = causal_conv1d(x, w, initial_state=st, activation=act, backend="torch")
    y1, f1 = causal_conv1d(x, w, initial_state=st, activation=act, backend="triton")
    assert f0 is not None and f1 is not None
    diff = y1.float() != y0.float()
    ulp = 0.0
    if diff.any():
        ulp = float(((y1.float() - y0.float()).abs() / y0.float().abs().clamp_min(1e-30))[diff].max())
    return {
        "shape": [B, T, C], "dtype": str(dtype).split(".")[-1], "initial_state": state, "strided": strided,
        "activation": act, "y_bitwise_equal": bool(torch.equal(y0, y1)), "y_unequal_fraction": float(diff.float().mean()),
        "y_max_rel_diff": ulp, "state_bitwise_equal": bool(torch.equal(f0, f1)),
        "torch_ms": round(timed_ms(lambda: causal_conv1d(x, w, initial_state=st, activation=act, backend="torch")), 4),
        "triton_ms": round(timed_ms(lambda: causal_conv1d(x, w, initial_state=st, activation=act, backend="triton",
                                                          output_final_state=False)), 4),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/conv_triton_check_h200.json")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh from the OS")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    import triton

    rows = {}
    print(f"{'case':18s} {'shape':>18s} {'dtype':8s} {'y equal':>8s} {'state eq':>8s} {'torch ms':>9s} {'triton ms':>9s}")
    for name, case in CASES.items():
        with torch.inference_mode():
            r = run_case(*case, gen)
        rows[name] = r
        print(f"{name:18s} {r['shape']!s:>18s} {r['dtype']:8s} {r['y_bitwise_equal']!s:>8s} "
              f"{r['state_bitwise_equal']!s:>8s} {r['torch_ms']:9.4f} {r['triton_ms']:9.4f}", flush=True)  # fmt: skip
    ok = all(r["y_bitwise_equal"] and r["state_bitwise_equal"] for r in rows.values())
    record = {
        "what": "causal_conv1d prefill: Triton kernel vs torch path, bitwise (benchmarks/check_conv_triton.py)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__},
        "seed": seed,
        "tolerance": "bitwise equality (torch.equal) of outputs and final states",
        "all_bitwise_equal": ok,
        "cases": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    print(f"all bitwise equal: {ok}; JSON: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
