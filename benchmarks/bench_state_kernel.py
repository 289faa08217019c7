#!/usr/bin/env python3
"""The GDN state kernel's parts at 15B sizes: its conv prologue, the conv as a launch of its own, and its bounds.

At Super Apriel 15B sizes (GDN: HK=8, HV=32, DK=DV=128, conv kernel 4; bf16 activations, fp32 state) and each batch,
one launch each (value columns per program ``BV``, warps ``W``), inside a CUDA graph that steps through enough
independent input sets to exceed the 50 MB L2, median per step:

- ``state_bv<BV>_w<W>``: ``gdn_state_kernel`` as the runtime launches it below ``fused_decode.PRECONV_MIN_ROWS``
  rows: each program convolves its q, k and v block from the conv state;
- ``pre_bv<BV>_w<W>``: the same kernel with ``PRECONV`` (q, k, v read as they are: the runtime's path from
  ``PRECONV_MIN_ROWS`` rows, after the conv launch);
- ``copy_bv<BV>_w<W>``: the same grid and tiles doing nothing but ``S = 0.999 * S`` and a column sum (the bound of
  the tile design: no prologue, no reductions over the key dimension);
- ``conv_r<R>_c<C>[_w<W>]``: ``conv_update_kernel`` (the conv launch from ``PRECONV_MIN_ROWS`` rows) over GDN's
  6144 q/k/v channels with ``R`` rows and ``C`` channels per program (and ``W`` warps, default 4);
- ``torch_mul``: ``state.mul_(0.999)``, torch's elementwise kernel over the same state bytes.

Bytes: the fp32 state read and written (``conv_*``: the conv input and output, the conv state read and written);
compared with a device-to-device copy measured in the same run. The timings do not check results: the state and
conv kernels are checked against the torch reference by ``benchmarks/bench_decode_kernels.py`` and the CPU tests.

    python benchmarks/bench_state_kernel.py --batches 64,256,1024 --out $OUT/state_kernel_h200.json

Writes JSON (machine, versions, command, date, one row per batch and variant) and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_decode_kernels import time_graph

from placement_search.evaluators.throughput import copy_bandwidth_gbps
from placement_search.files import write_json_atomic
from placement_search.kernels import _fused_decode_triton as F
from placement_search.kernels import fused_decode as fd
from placement_search.kernels._pdl_triton import pdl_enter
from placement_search.kernels.backend import pdl_launch

HK, HV, DK, DV, KW = 8, 32, 128, 128, 4
C = 2 * HK * DK + HV * DV  # q/k/v conv channels
VARIANTS = ("state_bv64_w4,pre_bv64_w4,copy_bv64_w4,conv_r4_c256,conv_r1_c256,conv_r1_c1024,conv_r8_c128,"
            "conv_r2_c512,torch_mul")  # fmt: skip


@triton.jit
def tile_copy_kernel(state_ptr, o_ptr, s_o, BK: tl.constexpr, BV: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr,
                     DV: tl.constexpr, PDL: tl.constexpr = 0):  # fmt: skip
    """``gdn_state_kernel``'s grid and state tiles with nothing else: ``S *= 0.999`` in place, column sums out."""
    pdl_enter(PDL)
    i_b = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    p = state_ptr + ((i_b * HV + hv) * DK + rk[:, None]) * DV + v0 + rv[None, :]
    s = tl.load(p) * 0.999
    tl.store(p, s)
    tl.store(o_ptr + i_b * s_o + hv * DV + v0 + rv, tl.sum(s, axis=0).to(o_ptr.dtype.element_ty))


def make(batch: int, dev: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random inputs of one GDN step at ``batch`` rows (qkv a row-strided slice of a wider projection output)."""

    def r(*shape: int, std: float = 1.0, dt: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, generator=gen) * std).to(dt)

    return {
        "qkv": r(batch, C + HV * DV)[:, :C], "b": r(batch, HV), "a": r(batch, HV), "conv_state": r(batch, C, KW - 1),
        "w": r(C, KW, std=0.5), "A_log": torch.rand(HV, device=dev, generator=gen).to(torch.bfloat16),
        "dt_bias": r(HV), "state": r(batch, HV, DK, DV, std=0.05, dt=torch.float32),
        "o": torch.empty(batch, HV * DV, dtype=torch.bfloat16, device=dev),
    }  # fmt: skip


def launch(variant: str, x: dict[str, torch.Tensor], pdl: dict) -> None:
    kind, *opts = variant.split("_")
    if kind == "torch":
        x["state"].mul_(0.999)
        return
    o = {p.rstrip("0123456789"): int(p.lstrip("bvwrc")) for p in opts}
    if kind == "conv":
        fd.CONV_ROWS, fd.CONV_BLOCK, fd.CONV_WARPS = o["r"], o["c"], o.get("w", 4)
        fd._conv_launch(F, pdl, (x["qkv"],), (x["conv_state"],), (x["w"],))
        return
    batch = x["state"].shape[0]
    grid = (batch, HV, DV // o["bv"])
    if kind == "copy":
        tile_copy_kernel[grid](x["state"], x["o"], x["o"].stride(0), BK=DK, BV=o["bv"], HV=HV, DK=DK, DV=DV,
                               num_warps=o["w"], **pdl)  # fmt: skip
        return
    cs, qkv = x["conv_state"], x["qkv"]
    F.gdn_state_kernel[grid](
        qkv, qkv.stride(0), x["b"], x["b"].stride(0), x["a"], x["a"].stride(0), cs, cs.stride(0), cs.stride(1),
        cs.stride(2), x["w"], x["w"].stride(0), x["w"].stride(1), x["A_log"], x["dt_bias"], x["state"], x["o"],
        x["o"].stride(0), DK**-0.5, HK=HK, HV=HV, DK=DK, DV=DV, BK=DK, BV=o["bv"], KW=KW, KWP=4, L2_EPS=1e-6,
        num_warps=o["w"], PRECONV=kind == "pre", **pdl,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,256,1024")
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--out", required=True, help="JSON path")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_state_kernel: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator(dev).manual_seed(0)
    pdl = pdl_launch(dev)
    copy = copy_bandwidth_gbps(dev)
    conv_default = fd.CONV_ROWS, fd.CONV_BLOCK, fd.CONV_WARPS
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        sets = max(2, min(32, (256 << 20) // (batch * HV * DK * DV * 4)))
        xs = [make(batch, dev, gen) for _ in range(sets)]
        for v in args.variants.split(","):
            ms = statistics.median(time_graph(lambda v=v, xs=xs: [launch(v, x, pdl) for x in xs], dev, 40))
            us = ms / sets * 1e3
            nbytes = batch * C * 2 * 8 if v.startswith("conv") else 2 * batch * HV * DK * DV * 4
            rows.append({"batch": batch, "variant": v, "us": us, "bytes": nbytes,
                         "fraction_of_copy": nbytes / (us * 1e-6) / (copy * 1e9)})  # fmt: skip
            print(f"B={batch:5d} {v:>14} {us:9.2f} us  {rows[-1]['fraction_of_copy']:6.3f} of copy", flush=True)
        del xs
    fd.CONV_ROWS, fd.CONV_BLOCK, fd.CONV_WARPS = conv_default
    write_json_atomic(Path(args.out), {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name(dev), "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "copy_bandwidth_gbs": copy, "pdl": bool(pdl), "rows": rows,
    })  # fmt: skip
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
