#!/usr/bin/env python3
"""Attention decode alone at Super Apriel 15B sizes: SDPA (the runtime's default) against the Triton split-K kernel.

One query per sequence over a full KV cache at context L (slots ``0..L-1`` valid) or over the sliding-window ring
(``W`` slots, full), ``[B, S, Hkv, D]`` bf16, 32 query heads over 8 KV heads of 128. Variants:

- ``sdpa``: ``attention_decode(..., bias=)`` as the runtime calls it (cuDNN through SDPA, additive mask);
- ``triton``: the split-K Triton kernel with the boolean mask (each block's mask bytes loaded, then K/V);
- ``triton_len``: the same kernel given the rows' lengths (``PREFIX``: the valid slots are a prefix; no mask
  loads, nothing past a row's length read);
- ``triton_len_b<S>_st<N>_w<W>_p<P>`` (any subset of the suffixes): ``S`` slots per block, ``N`` blocks in flight,
  ``W`` warps, ``P`` programs per SM (``kernels.attention.TRITON_DECODE_*``).

Each case runs in a CUDA graph that steps through enough independent caches to exceed the L2 cache several times
(one at 32K: the cache of one layer is 134 MB at batch 1), median over replays, divided by the cache count. Bytes:
the K and V slots read once, the query and the output. Achieved bandwidth is compared with a device-to-device copy
measured in the same run (bytes read + written: a read-only stream can exceed it). Correctness: every variant
against ``backend="reference"`` (fp32 softmax) on the first cache, norm-wise relative error.

    python benchmarks/bench_attention_decode.py --out results            # H200: table + results/attention_decode_<gpu>.json
    python benchmarks/bench_attention_decode.py --sweep                  # and the Triton tile sweep at batch 1
"""

from __future__ import annotations

import argparse
import itertools
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from profile_decode_step import copy_bandwidth

from placement_search import kernels as K
from placement_search.evaluators.throughput import CapturedStep, free_memory
from placement_search.files import write_json_atomic
from placement_search.spec import get_spec

A = sys.modules["placement_search.kernels.attention"]  # the module (the package's ``attention`` is the op)
#: The graph's caches together exceed the L2 cache (50 MB) about 5x.
ROTATE_BYTES = 256 * 2**20
MAX_CACHES = 32
#: (cache kind, context, batch): full caches at L, the SWA ring (full) at the spec's window.
CASES = [("full", 4096, 1), ("full", 32768, 1), ("full", 131072, 1), ("full", 4096, 16), ("full", 32768, 16),
         ("ring", 0, 1), ("ring", 0, 16), ("ring", 0, 64)]  # fmt: skip
SWEEP_CASES = [("full", 32768, 1), ("ring", 0, 1)]
SWEEP = {"b": (32, 64, 128), "st": (2, 3, 4), "w": (4, 8), "p": (1, 2, 4)}
KNOBS = {"b": "TRITON_DECODE_BLOCK_S", "st": "TRITON_DECODE_STAGES", "w": "TRITON_DECODE_WARPS",
         "p": "TRITON_DECODE_PROGRAMS_PER_SM"}  # fmt: skip


def parse_variant(name: str) -> tuple[str, dict[str, int]]:
    """``(base, knob settings)`` of a variant name (see the module docstring)."""
    for base in ("triton_len", "triton", "sdpa"):
        if name == base or name.startswith(base + "_"):
            opts: dict[str, int] = {}
            for part in name[len(base) + 1 :].split("_") if name != base else []:
                key = part.rstrip("0123456789")
                if key not in KNOBS or not part[len(key) :].isdigit() or base == "sdpa":
                    raise SystemExit(f"unknown variant {name!r}: sdpa, triton or triton_len[_b<S>][_st<N>][_w<W>][_p<P>]")
                opts[key] = int(part[len(key) :])
            return base, opts
    raise SystemExit(f"unknown variant {name!r}: sdpa, triton or triton_len[_b<S>][_st<N>][_w<W>][_p<P>]")


def run(variant: str, q, k, v, valid, bias, lengths, scale: float):  # type: ignore[no-untyped-def]
    base, opts = parse_variant(variant)
    if base == "sdpa":
        return K.attention_decode(q, k, v, valid, scale=scale, backend="sdpa", bias=bias)
    before = {key: getattr(A, attr) for key, attr in KNOBS.items()}
    for key, val in opts.items():
        setattr(A, KNOBS[key], val)
    try:
        return K.attention_decode(q, k, v, valid, scale=scale, backend="triton",
                                  lengths=lengths if base == "triton_len" else None)  # fmt: skip
    finally:
        for key, val in before.items():
            setattr(A, KNOBS[key], val)


def bench_case(kind: str, context: int, batch: int, variants: list[str], device, gen, log) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    spec = get_spec("super-apriel-15b")
    att = next(m for layer in spec.layers for m in layer.mixers.values() if m.kind == "attention" and
               (m.window_size is not None) == (kind == "ring"))  # fmt: skip
    hq, hkv, dh = att.heads, att.head_groups, att.head_size
    slots = att.window_size if kind == "ring" else context
    kv_bytes = 2 * batch * slots * hkv * dh * 2
    n = max(1, min(MAX_CACHES, -(-ROTATE_BYTES // kv_bytes)))
    sets = []
    for _ in range(n):
        q = torch.randn(batch, 1, hq, dh, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(batch, slots, hkv, dh, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(batch, slots, hkv, dh, device=device, dtype=torch.bfloat16, generator=gen)
        pos = torch.full((batch,), (context if kind == "full" else 10 * slots) - 1, device=device)
        valid = torch.arange(slots, device=device)[None, :] <= pos[:, None]
        sets.append((q, k, v, valid, K.decode_bias(valid, q.dtype), K.decode_lengths(pos, slots)))
    nbytes = kv_bytes + 2 * sets[0][0].nbytes
    scale = dh**-0.5
    ref = K.attention_decode(*sets[0][:4], scale=scale, backend="reference").float()
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"cache": kind, "context": context if kind == "full" else None, "slots": slots,
                               "batch": batch, "variant": variant, "bytes": nbytes, "caches": n}  # fmt: skip
        try:
            out = run(variant, *sets[0], scale).float()
            row["rel_err"] = float((out - ref).norm() / ref.norm())

            def step(variant: str = variant) -> None:
                for s in sets:
                    run(variant, *s, scale)

            cap = CapturedStep(step, device)
            t = cap.time(20, budget_s=0.4)
            cap.close()
            row["us"] = t.ms * 1e3 / n
            row["gbps"] = nbytes / (row["us"] / 1e6) / 1e9
        except Exception as e:  # one failing variant (a tile that does not fit) must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        log(f"{kind} L={context:>6} S={slots:>6} B={batch:>3} {variant:>28}: " + (
            f"error {row['error']}" if "error" in row else
            f"{row['us']:8.1f} us {row['gbps']:7.0f} GB/s err {row['rel_err']:.1e}"))  # fmt: skip
    sets.clear()
    free_memory(device)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--variants", default="sdpa,triton,triton_len", help="comma list (see the module docstring)")
    ap.add_argument("--sweep", action="store_true", help="also the Triton tile sweep (triton_len) at batch 1, 32K and the ring")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        parse_variant(v)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    copy = copy_bandwidth(device)
    print(f"copy bandwidth {copy / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    for kind, context, batch in CASES:
        rows += bench_case(kind, context, batch, variants, device, gen, lambda s: print(s, flush=True))
    if args.sweep:
        sweep = ["triton_len_" + "_".join(f"{k}{v}" for k, v in zip(SWEEP, combo, strict=True))
                 for combo in itertools.product(*SWEEP.values())]  # fmt: skip
        for kind, context, batch in SWEEP_CASES:
            rows += bench_case(kind, context, batch, sweep, device, gen, lambda s: print(s, flush=True))
    for r in rows:
        if "gbps" in r:
            r["fraction_of_copy"] = r["gbps"] * 1e9 / copy
    print(f"\n{'cache':5} {'slots':>6} {'B':>3} " + " ".join(f"{v:>12}" for v in variants) + "   (us, % of copy)")
    for kind, context, batch in CASES:
        cells = []
        for v in variants:
            r = next((r for r in rows if (r["cache"], r["batch"], r["variant"]) == (kind, batch, v) and
                      (kind == "ring" or r["context"] == context)), {})  # fmt: skip
            cells.append(f"{r['us']:6.1f} {100 * r['fraction_of_copy']:4.0f}%" if "us" in r else f"{'err':>12}")
        slots = next(r["slots"] for r in rows if r["cache"] == kind and (kind == "ring" or r["context"] == context))
        print(f"{kind:5} {slots:>6} {batch:>3} " + " ".join(cells))
    if args.sweep:
        for kind, context, batch in SWEEP_CASES:
            best = sorted((r for r in rows if (r["cache"], r["batch"]) == (kind, batch) and "us" in r and
                           r["variant"].count("_") > 1 and (kind == "ring" or r["context"] == context)),
                          key=lambda r: r["us"])[:5]  # fmt: skip
            print(f"sweep {kind} {context} B={batch}: " + ", ".join(f"{r['variant'][11:]} {r['us']:.1f}" for r in best))
    import triton

    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(device),
            "host": platform.node(), "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_gbps": copy / 1e9, "defaults": {k: getattr(A, a) for k, a in KNOBS.items()}, "note": args.note}  # fmt: skip
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / f"attention_decode_{torch.cuda.get_device_name(device).split()[-1].lower()}.json"
    write_json_atomic(path, {**meta, "rows": rows})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
