#!/usr/bin/env python3
"""The MLP of a decode step as one persistent launch with a grid barrier, against the runtime's two launches.

Each skinny projection of the runtime's decode step takes about 5.4 us plus its weight bytes at 4.5 TB/s on the H200
(the four projection roles of ``results/decode_step_profile_h200.json`` lie on that line): about 1.0 ms of a 7.8 ms
batch-1 step. This prototype measures whether a grid barrier between two dependent projections costs less than a
kernel boundary, for the MLP's gate/up (``silu(x Wg^T) * (x Wu^T)``, ``[2 x 14336, 5120]``) and down (``a Wd^T + r``,
``[5120, 14336]``, split-K). On the H200 it does not (results/persistent_mlp_h200.json): the two launches reach 97.6%
of the copy rate at batch 1, the best persistent grid 91% (7-8% slower), so the runtime keeps two launches.

- ``two``: the runtime's path, ``gated_linear`` then ``linear(..., residual=r)`` (two launches, PDL);
- ``p<G>_s<S>[_pf<L>]``: :func:`mlp_persistent_kernel` on ``G`` programs: each takes every ``G``-th gate/up column
  block, all meet at a grid barrier (an arrival counter and a generation flag), then each takes every ``G``-th of
  the down projection's column blocks x ``S`` K ranges (the last program of a column block to arrive sums the
  ranges in a fixed order, as the runtime's split-K does); ``_pf<L>``: before waiting at the barrier each program
  asks L2 for the first ``L`` 128-byte lines of its first down-projection weight rows (weights are no kernel's
  output, so this is safe before the barrier).

``G`` must let every program be resident at once (the barrier waits for all of them): at most 132 SMs x programs
per SM. The gate/up half runs 32 columns, 128-wide K steps, 3 stages (the runtime's tiles when measured; it now
runs 64 columns, which sum the same K tiles in the same order) with the same rounding, so its output is bit-equal
to ``gated_linear``'s; the down half sums ``S`` K ranges where the runtime sums 2, so it
is compared with a tolerance (fp32 sums in another order, then one bf16 rounding: 2^-7 relative).

Timing: ``--layers`` MLPs with their own weights (more bytes than L2 holds) one after the other in a CUDA graph,
medians of ``--replays`` replays, per MLP.

    python benchmarks/bench_persistent_mlp.py --batches 1,16 --variants two,p224_s7,p112_s7,p64_s2 --out $OUT

Writes JSON (machine, versions, command, date, one row per batch and variant) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from placement_search.files import write_json_atomic
from placement_search.kernels import projection as P
from placement_search.kernels._pdl_triton import pdl_enter, prefetch_rows_l2
from placement_search.kernels._projection_triton import _skinny_epilogue
from placement_search.kernels.backend import SKINNY_MAX_ROWS, pdl_launch

HIDDEN, INTER = 5120, 14336
#: gate/up tiles (the runtime's when measured; since then it runs 64 columns a program, the same sums) and the down
#: projection's
GU = {"BN": 32, "BK": 128, "STAGES": 3}
DOWN = {"BN": 32, "BK": 128, "STAGES": 4}
VARIANTS = "two,p224_s7,p112_s7,p64_s2,p224_s7_pf4"


@triton.jit
def _grid_barrier(bar_ptr):
    """Every program of the grid arrives before any leaves. ``bar_ptr``: int32 ``[2]``, an arrival counter (zero
    between launches: the last to arrive re-arms it) and a generation flag (bumped by the last to arrive; the others
    wait for it to change). gpu-scope acquire/release, so the writes before the barrier are visible after it."""
    tl.debug_barrier()  # every thread's stores before the single-thread release
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    cnt = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
    if cnt == tl.num_programs(0) - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
    flag = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    while flag == gen:
        flag = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def mlp_persistent_kernel(
    x_ptr, s_x,  # [M, K1] input rows
    wg_ptr, wu_ptr, s_w1,  # [N1, K1] gate and up weights (same row stride)
    wd_ptr, s_w2,  # [N2, N1] down weight
    r_ptr, s_r,  # [M, N2] residual
    a_ptr, s_a,  # [M, N1] silu(gate) * up (written, then read back after the barrier)
    o_ptr, s_o,  # [M, N2] output
    ws_ptr,  # fp32 [SPLIT, cdiv(N2, BN2), M, BN2] partial products of the down projection
    lock_ptr,  # int32 [cdiv(N2, BN2)] arrival counters, zero between launches
    bar_ptr,  # int32 [2] grid barrier (see _grid_barrier), zero-initialised once
    M, N1, K1, N2,
    BM: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, ST1: tl.constexpr,
    BN2: tl.constexpr, BK2: tl.constexpr, ST2: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr = 0, PREFETCH: tl.constexpr = 0,
):  # fmt: skip
    """``o = (silu(x Wg^T) * (x Wu^T)) Wd^T + r`` for ``M <= BM`` rows in one launch (see the module docstring).
    K1 and N1 multiples of BK1 / BK2 and of SPLIT * BK2 (15B sizes)."""
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    rm = tl.arange(0, BM)
    mm = rm < M
    pdl_enter(PDL)
    # gate/up: every G-th column block of N1
    rk1 = tl.arange(0, BK1)
    for t in range(pid, tl.cdiv(N1, BN1), G):
        rn = t * BN1 + tl.arange(0, BN1)
        nm = rn < N1
        x_ptrs = x_ptr + rm[:, None] * s_x + rk1[None, :]
        g_ptrs = wg_ptr + rn.to(tl.int64)[:, None] * s_w1 + rk1[None, :]
        u_ptrs = wu_ptr + rn.to(tl.int64)[:, None] * s_w1 + rk1[None, :]
        acc = tl.zeros((BM, BN1), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN1), dtype=tl.float32)
        for _k0 in tl.range(0, K1, BK1, num_stages=ST1):
            x = tl.load(x_ptrs, mask=mm[:, None], other=0.0)
            wg = tl.load(g_ptrs, mask=nm[:, None], other=0.0)
            wu = tl.load(u_ptrs, mask=nm[:, None], other=0.0)
            if UPCAST:
                x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc = tl.dot(x, tl.trans(wg), acc)
            acc2 = tl.dot(x, tl.trans(wu), acc2)
            x_ptrs += BK1
            g_ptrs += BK1
            u_ptrs += BK1
        _skinny_epilogue(acc, acc2, a_ptr, a_ptr, 0, a_ptr, s_a, rm, rn, mm, nm, DTYPE, True, False, False,
                         False, a_ptr, a_ptr, 0, a_ptr, BM)  # fmt: skip
    # down: every G-th (column block, K range); the K ranges split N1 evenly
    nb2 = tl.cdiv(N2, BN2)
    chunk = (N1 // (SPLIT * BK2)) * BK2  # a visible multiple of BK2: aligned loads, so the loop pipelines
    rk2 = tl.arange(0, BK2)
    if PREFETCH > 0:  # the first down tile's weight rows, while waiting at the barrier
        rn0 = (pid % nb2) * BN2 + tl.arange(0, BN2)
        k0 = (pid // nb2) * chunk
        prefetch_rows_l2(wd_ptr, s_w2, rn0, N2, k0, k0 + chunk, PREFETCH)
    _grid_barrier(bar_ptr)
    for t in range(pid, nb2 * SPLIT, G):
        pid_n = t % nb2
        pid_k = t // nb2
        rn = pid_n * BN2 + tl.arange(0, BN2)
        nm = rn < N2
        k_lo = pid_k * chunk
        a_ptrs = a_ptr + rm[:, None] * s_a + k_lo + rk2[None, :]
        w_ptrs = wd_ptr + rn.to(tl.int64)[:, None] * s_w2 + k_lo + rk2[None, :]
        acc = tl.zeros((BM, BN2), dtype=tl.float32)
        for _k0 in tl.range(0, chunk, BK2, num_stages=ST2):
            # written by other SMs before the barrier: the pipeline's cp.async.cg reads L2, not L1
            a = tl.load(a_ptrs, mask=mm[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=nm[:, None], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc)
            a_ptrs += BK2
            w_ptrs += BK2
        tile = M * BN2
        wmask = mm[:, None]
        ws_tile = ws_ptr + rm[:, None] * BN2 + tl.arange(0, BN2)[None, :]
        tl.store(ws_tile + (pid_k * nb2 + pid_n).to(tl.int64) * tile, acc, mask=wmask)
        tl.debug_barrier()
        cnt = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT - 1:
            tl.debug_barrier()
            first = ws_tile + pid_n.to(tl.int64) * tile
            step = nb2.to(tl.int64) * tile
            tot = tl.load(first, mask=wmask, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT):
                tot += tl.load(first + i * step, mask=wmask, other=0.0, cache_modifier=".cg")
            _skinny_epilogue(tot, tot, o_ptr, r_ptr, s_r, o_ptr, s_o, rm, rn, mm, nm, DTYPE, False, True, False,
                             False, o_ptr, o_ptr, 0, o_ptr, BM)  # fmt: skip
            tl.atomic_xchg(lock_ptr + pid_n, 0)


class PersistentMLP:
    """Buffers and launch of :func:`mlp_persistent_kernel` for ``M <= 16`` rows on ``programs`` programs."""

    def __init__(self, m: int, device: torch.device, programs: int, split: int, prefetch: int = 0, *,
                 inter: int = INTER, hidden: int = HIDDEN) -> None:  # fmt: skip
        if inter % (split * DOWN["BK"]) or hidden % GU["BK"]:
            raise ValueError(f"sizes {hidden} / {inter}: not multiples of BK {GU['BK']} / SPLIT {split} x BK")
        self.m, self.programs, self.split, self.prefetch = m, programs, split, prefetch
        self.inter, self.hidden = inter, hidden
        nb2 = -(-hidden // DOWN["BN"])
        self.a = torch.empty(m, inter, dtype=torch.bfloat16, device=device)
        self.ws = torch.empty(split, nb2, m, DOWN["BN"], dtype=torch.float32, device=device)
        self.locks = torch.zeros(nb2, dtype=torch.int32, device=device)
        self.bar = torch.zeros(2, dtype=torch.int32, device=device)

    def __call__(self, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                 r: torch.Tensor) -> torch.Tensor:  # fmt: skip
        out = torch.empty_like(r)
        launch: dict[str, Any] = pdl_launch(x.device)
        if launch and self.prefetch:
            launch["PREFETCH"] = self.prefetch
        mlp_persistent_kernel[(self.programs,)](
            x, x.stride(0), wg, wu, wg.stride(0), wd, wd.stride(0), r, r.stride(0), self.a, self.a.stride(0),
            out, out.stride(0), self.ws, self.locks, self.bar, self.m, self.inter, self.hidden, self.hidden,
            BM=SKINNY_MAX_ROWS, BN1=GU["BN"], BK1=GU["BK"], ST1=GU["STAGES"], BN2=DOWN["BN"], BK2=DOWN["BK"],
            ST2=DOWN["STAGES"], SPLIT=self.split, UPCAST=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4,
            **launch,
        )  # fmt: skip
        return out


def two_launches(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                 r: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The runtime's MLP: the gated projection, then the down projection with the residual (two launches)."""
    a = P.gated_linear(x, wg, wu, backend="triton")
    return P.linear(a, wd, residual=r, backend="triton")


def parse_variant(name: str) -> tuple[int, int, int] | None:
    """``two`` -> None; ``p<G>_s<S>[_pf<L>]`` -> (G, S, L)."""
    if name == "two":
        return None
    parts = name.split("_")
    try:
        if parts[0][0] != "p" or parts[1][0] != "s" or (len(parts) == 3 and not parts[2].startswith("pf")):
            raise ValueError
        return int(parts[0][1:]), int(parts[1][1:]), int(parts[2][2:]) if len(parts) == 3 else 0
    except (ValueError, IndexError):
        raise SystemExit(f"unknown variant {name!r}: expected two or p<programs>_s<splits>[_pf<lines>]") from None


def weights(layers: int, device: torch.device, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    return [(r(INTER, HIDDEN), r(INTER, HIDDEN), r(HIDDEN, INTER)) for _ in range(layers)]


def main(argv: list[str] | None = None) -> int:
    from bench_decode_kernels import copy_bandwidth, time_graph, versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--layers", type=int, default=6, help="MLPs with their own weights in one graph")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default=None, help="folder or .json path for the results")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = weights(args.layers, dev, gen)
    variants = args.variants.split(",")
    copy = copy_bandwidth(dev)
    rows: list[dict[str, Any]] = []
    mlp_bytes = sum(t.numel() * t.element_size() for t in ws[0])
    print(f"copy {copy:.1f} GB/s; {args.layers} MLPs of {mlp_bytes / 1e6:.1f} MB per graph")
    print(f"{'B':>3} {'variant':16} {'us/MLP':>8} {'GB/s':>8} {'of copy':>8} {'max rel err':>12}")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, HIDDEN, device=dev, generator=gen).to(torch.bfloat16)
        r = torch.randn(batch, HIDDEN, device=dev, generator=gen).to(torch.bfloat16)
        ref = [two_launches(x, *w, r) for w in ws]
        for name in variants:
            spec = parse_variant(name)
            fn = two_launches if spec is None else PersistentMLP(batch, dev, *spec)
            outs = [fn(x, *w, r) for w in ws]
            err = max(float(((o.float() - e.float()).abs().max() / e.float().abs().max()).item())
                      for o, e in zip(outs, ref, strict=True))  # fmt: skip
            times = time_graph(lambda fn=fn, x=x, r=r: [fn(x, *w, r) for w in ws], dev, args.replays)
            us = statistics.median(times) * 1e3 / args.layers
            gbs = mlp_bytes / us / 1e3
            rows.append({"batch": batch, "variant": name, "us_per_mlp": us, "gbps": gbs, "fraction_of_copy": gbs / copy,
                         "max_rel_err_vs_two": err, "bytes_per_mlp": mlp_bytes})  # fmt: skip
            print(f"{batch:>3} {name:16} {us:8.2f} {gbs:8.1f} {gbs / copy:8.1%} {err:12.2e}", flush=True)
    if args.out:
        out = Path(args.out)
        out = out / "persistent_mlp_h200.json" if out.suffix != ".json" else out
        write_json_atomic(out, {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": torch.cuda.get_device_name(),
            "python": platform.python_version(), **versions(), "copy_bandwidth_gbs": copy, "layers": args.layers,
            "rows": rows,
        })  # fmt: skip
        print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
