#!/usr/bin/env python3
"""The attention layer's fused q/k/v projection + RoPE + KV-cache write (``K.linear_rope_cache``) on the GPU, against
the two launches it replaces (the Triton projection, then ``K.rope_cache_write``), at Super Apriel 15B sizes.

Fresh random bf16 inputs each run (``--seed``): rows of the residual stream, the packed ``[q | k | v]`` weight
``[(32 + 2 x 8) x 128, 5120]`` scaled as a trained projection's output would be (unit variance), RoPE tables at
random positions, caches of ``--slots`` slots (a full cache, and a ring whose slot is ``pos % slots``). Both paths
round each product to bf16, rotate in fp32 and round again, so the rotated queries and the caches should be equal
bit for bit; the compiler may contract ``y * cos + partner * sin`` into a fused multiply-add differently in the two
kernels, so a difference of one bf16 unit in the last place is reported (``max_ulp``), not failed. A wrong pairing,
sign or slot gives differences of the order of the values themselves. Also: every slot but the written one
untouched, and the two paths' times (CUDA events, median of ``--reps`` calls after warm-up).

    python benchmarks/check_fused_rope.py --out $OUT/fused_rope_check_h200.json

Writes JSON (date, GPU, versions, command, one row per batch and cache) and prints a table; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from datetime import UTC, datetime

import torch
from check_conv_triton import timed_ms

from placement_search import kernels as K
from placement_search.files import write_json_atomic

H, HKV, D, HIDDEN = 32, 8, 128, 5120


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (on the raw bit patterns, same-sign values)."""
    ai, bi = a.contiguous().view(torch.int16).int(), b.contiguous().view(torch.int16).int()
    return int((ai - bi).abs().max()) if a.numel() else 0


def check(batch: int, slots: int, ring: bool, gen: torch.Generator, reps: int) -> dict:
    dev, bf = torch.device("cuda"), torch.bfloat16
    w = (torch.randn((H + 2 * HKV) * D, HIDDEN, generator=gen) * HIDDEN**-0.5).to(dev, bf)
    x = torch.randn(batch, HIDDEN, generator=gen).to(dev, bf)
    pos = torch.randint(slots // 2, 4 * slots, (batch,), generator=gen).to(dev)
    slot = pos % slots if ring else torch.randperm(slots, generator=gen)[:batch].to(dev)
    cos, sin = K.rope_step_tables(pos, D, 1e9, dtype=bf)
    caches = [torch.randn(batch, slots, HKV, D, generator=gen).to(dev, bf) for _ in range(2)]
    c0, c1 = [c.clone() for c in caches], [c.clone() for c in caches]

    def two_launches(cs=c0):
        y = K.linear(x, w, backend="triton")
        q, k, v = (t.view(batch, -1, D) for t in y.split([H * D, HKV * D, HKV * D], -1))
        return K.rope_cache_write(q, k, v, cos, sin, *cs, slot, backend="triton")

    def fused(cs=c1):
        return K.linear_rope_cache(x, w, H, HKV, cos, sin, slot, *cs, backend="triton")

    q0, q1 = two_launches(), fused()
    torch.cuda.synchronize()
    rows = torch.arange(batch, device=dev)
    kept = torch.ones(batch, slots, dtype=torch.bool, device=dev)
    kept[rows, slot] = False
    row = {
        "batch": batch, "slots": slots, "ring": ring,
        "q_equal": bool(torch.equal(q0, q1)), "k_equal": bool(torch.equal(c0[0], c1[0])),
        "v_equal": bool(torch.equal(c0[1], c1[1])),
        "max_ulp": max(_ulps(q0, q1), _ulps(c0[0][rows, slot], c1[0][rows, slot])),
        "others_kept": bool(torch.equal(c1[0][kept], caches[0][kept]) and torch.equal(c1[1][kept], caches[1][kept])),
        "two_launches_us": 1e3 * timed_ms(two_launches, reps), "fused_us": 1e3 * timed_ms(fused, reps),
    }  # fmt: skip
    row["pass"] = row["max_ulp"] <= 1 and row["v_equal"] and row["others_kept"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON path")
    ap.add_argument("--batches", default="1,5,16")
    ap.add_argument("--slots", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None, help="default: fresh")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_fused_rope: needs a CUDA GPU", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int(torch.seed() % 1_000_000)
    gen = torch.Generator().manual_seed(seed)
    rows = [check(int(b), args.slots, ring, gen, args.reps) for b in args.batches.split(",") for ring in (False, True)]
    print(f"{'batch':>5} {'cache':>5} {'q==':>4} {'k==':>4} {'v==':>4} {'ulp':>3} {'2 launches':>11} {'fused':>8}  pass")
    for r in rows:
        print(f"{r['batch']:>5} {'ring' if r['ring'] else 'full':>5} {r['q_equal']!s:>4} {r['k_equal']!s:>4} "
              f"{r['v_equal']!s:>4} {r['max_ulp']:>3} {r['two_launches_us']:>8.1f} us {r['fused_us']:>5.1f} us  "
              f"{r['pass']}")  # fmt: skip
    write_json_atomic(args.out, {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "command": shlex.join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name(), "python": platform.python_version(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "seed": seed, "rows": rows,
        "all_pass": all(r["pass"] for r in rows),
    })  # fmt: skip
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
