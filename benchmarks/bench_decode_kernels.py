#!/usr/bin/env python3
"""GDN / KDA decode step between the projections: fused Triton kernel vs fla in place vs the previous runtime path.

For each mixer at Super Apriel 15B sizes (GDN: HK=8, HV=32, DK=DV=128; KDA: H=32, D=128; conv kernel 4, bf16
activations, fp32 states) and each batch B in {1, 16, 64, 256, 1024}, three implementations of the same step
(conv update + SiLU, L2 norms, gates, delta rule on the fp32 state, gated RMSNorm; the projections excluded):

- ``fused``: :func:`~placement_search.kernels.gdn_decode_step` / ``kda_decode_step`` with ``backend="triton"``
  (one launch);
- ``fla_inplace``: the same functions with ``backend="fla"``: torch ops around fla's fused-recurrent kernel, which
  updates the state in place;
- ``fused_bv<N>`` / ``fused_bv<N>_w<W>``: the fused kernels with N value columns (and W warps) per state program
  instead of the defaults (tuning; 128 columns is one program per head); a ``_cs`` suffix adds streaming cache
  hints on the state (``fused_decode.STATE_STREAM_HINTS``), ``_nopc`` / ``_pc`` the conv inside the state kernels
  / as a launch of its own at every batch (``fused_decode.PRECONV_MIN_ROWS``); ``--variants`` picks any list;
- ``previous``: the runtime's path before this change: the same torch ops around the public
  ``fused_recurrent_gated_delta_rule`` (fresh fp32 final state, copied back) for GDN, and around
  ``fused_recurrent_kda_fwd(inplace_final_state=True)`` for KDA (unchanged, so KDA's two fla rows coincide).

Each runs inside a CUDA graph; the time is the median over replays of a graph that steps through several
independent input sets (enough to exceed the 50 MB L2 several times over), divided by the set count. Bytes moved
per step: the fp32 state read and written, the conv states read and written, the inputs read and the output written
(weights of the conv / norm / gates, a few KB, are counted too). Achieved bandwidth is compared with a
device-to-device copy measured in the same run (bytes read + written). Correctness: every variant against
``backend="torch"`` on the same inputs on the GPU (relative error of the output and of the new state).

Usage:
    python benchmarks/bench_decode_kernels.py                      # H200: table + results/decode_kernels_<gpu>.json
    python benchmarks/bench_decode_kernels.py --device cpu --tiny  # smoke test in Triton's interpreter (CPU)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCHES = (1, 16, 64, 256, 1024)
L2_ROTATE_BYTES = 256 * 2**20  # the input sets of one graph together exceed the L2 cache (50 MB) ~5x
MAX_SETS = 64
#: Tile sweep next to the defaults (``BLOCK_V`` columns, 32 below ``SMALL_BATCH`` rows; warps from the tile size).
FUSED_SWEEP = ("fused_bv32", "fused_bv64", "fused_bv128", "fused_bv32_w2", "fused_bv64_w8", "fused_bv128_w8")


def _sizes(tiny: bool) -> dict[str, dict[str, int]]:
    if tiny:
        return {"gdn": {"HK": 2, "HV": 8, "DK": 16, "DV": 16, "KW": 4}, "kda": {"H": 4, "D": 16, "KW": 4}}
    return {"gdn": {"HK": 8, "HV": 32, "DK": 128, "DV": 128, "KW": 4}, "kda": {"H": 32, "D": 128, "KW": 4}}


def make_gdn(B: int, s: dict[str, int], device: Any, dtype: Any, gen: Any) -> dict[str, Any]:
    """Random inputs and states of one GDN step (the projections' outputs, as row-strided slices)."""
    import torch

    HK, HV, DK, DV, KW = s["HK"], s["HV"], s["DK"], s["DV"], s["KW"]
    C = 2 * HK * DK + HV * DV

    def r(*shape: int, std: float = 1.0, dt: Any = dtype) -> Any:
        return (torch.randn(*shape, device=device, generator=gen) * std).to(dt)

    qkvz, ba = r(B, C + HV * DV), r(B, 2 * HV)
    return {
        "qkv": qkvz[:, :C], "z": qkvz[:, C:], "b": ba[:, :HV], "a": ba[:, HV:],
        "conv_state": r(B, C, KW - 1), "conv_weight": r(C, 1, KW, std=0.5),
        "A_log": torch.rand(HV, device=device, generator=gen).mul(2.0).to(dtype), "dt_bias": r(HV, std=0.5),
        "norm_weight": (1.0 + r(DV, std=0.1, dt=torch.float32)).to(dtype),
        "state": r(B, HV, DK, DV, std=0.05, dt=torch.float32),
    }  # fmt: skip


def make_kda(B: int, s: dict[str, int], device: Any, dtype: Any, gen: Any) -> dict[str, Any]:
    """Random inputs and states of one KDA step."""
    import torch

    H, D, KW = s["H"], s["D"], s["KW"]
    P = H * D

    def r(*shape: int, std: float = 1.0, dt: Any = dtype) -> Any:
        return (torch.randn(*shape, device=device, generator=gen) * std).to(dt)

    return {
        "q": r(B, P), "k": r(B, P), "v": r(B, P), "f": r(B, P), "beta": r(B, H), "gate": r(B, P),
        "q_conv_state": r(B, P, KW - 1), "k_conv_state": r(B, P, KW - 1), "v_conv_state": r(B, P, KW - 1),
        "q_conv_weight": r(P, 1, KW, std=0.5), "k_conv_weight": r(P, 1, KW, std=0.5),
        "v_conv_weight": r(P, 1, KW, std=0.5),
        "A_log": torch.rand(H, device=device, generator=gen).mul(2.0).to(dtype), "dt_bias": r(P, std=0.5),
        "norm_weight": (1.0 + r(D, std=0.1, dt=torch.float32)).to(dtype),
        "state": r(B, H, D, D, std=0.05, dt=torch.float32),
    }  # fmt: skip


def step_bytes(x: dict[str, Any]) -> int:
    """Bytes one step must move: states (fp32 recurrent and conv) read and written, everything else read once,
    plus the output ``[B, heads*DV]`` written (same size and dtype as z / gate)."""
    total = 0
    for name, t in x.items():
        total += (2 if name == "state" or name.endswith("conv_state") else 1) * t.numel() * t.element_size()
    out = x["z"] if "z" in x else x["gate"]
    return total + out.numel() * out.element_size()


def previous_gdn(x: dict[str, Any]) -> Any:
    """The runtime's GDN step before the fused kernels: torch ops around the public fla call (new state + copy)."""
    import importlib

    import torch.nn.functional as F

    from placement_search import kernels as K

    B, HV, DK, DV = x["state"].shape
    C = x["qkv"].shape[1]
    HK = (C - HV * DV) // (2 * DK)
    y = K.causal_conv1d_update(x["qkv"], x["conv_state"], x["conv_weight"], activation="silu")
    q, k, v = y.split([HK * DK, HK * DK, HV * DV], dim=-1)
    g, beta = K.gdn_gate(x["a"], x["A_log"], x["dt_bias"]), x["b"].sigmoid()
    mod = importlib.import_module("fla.ops.gated_delta_rule")
    o, final = mod.fused_recurrent_gated_delta_rule(
        q.reshape(B, 1, HK, DK), k.reshape(B, 1, HK, DK), v.reshape(B, 1, HV, DV), g=g[:, None].contiguous(),
        beta=beta[:, None].contiguous(), scale=DK**-0.5, initial_state=x["state"], output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    x["state"].copy_(final)
    z = x["z"].view(B, HV, DV)
    return (K.rms_norm(o[:, 0].to(z.dtype), x["norm_weight"], 1e-5) * F.silu(z)).flatten(1)


def run_variant(kind: str, variant: str, x: dict[str, Any]) -> Any:
    from placement_search import kernels as K

    if kind == "gdn" and variant == "previous":
        return previous_gdn(x)
    fn = K.gdn_decode_step if kind == "gdn" else K.kda_decode_step
    if variant.startswith("fused"):  # "fused" (defaults), "fused_bv<N>" (N value columns per state program),
        # "fused_bv<N>_w<W>" / "fused_w<W>" (and W warps per state program), "..._cs" (streaming cache hints on
        # the state: fused_decode.STATE_STREAM_HINTS), "..._nopc" (the conv inside the state kernels at every
        # batch: fused_decode.PRECONV_MIN_ROWS out of reach), "..._pc" (the conv as a launch of its own at every batch)
        from placement_search.kernels import fused_decode as fd

        parts = variant.split("_")[1:]
        flags = {"cs", "nopc", "pc"}
        opts = {p.rstrip("0123456789"): int(p.lstrip("bvw")) for p in parts if p not in flags}
        before = fd.STATE_STREAM_HINTS, fd.PRECONV_MIN_ROWS
        fd.STATE_STREAM_HINTS = "cs" in parts
        fd.PRECONV_MIN_ROWS = 1 << 30 if "nopc" in parts else 1 if "pc" in parts else before[1]
        try:
            return fn(**x, norm_eps=1e-5, backend="triton", block_v=opts.get("bv"), num_warps=opts.get("w"))
        finally:
            fd.STATE_STREAM_HINTS, fd.PRECONV_MIN_ROWS = before
    backend = {"fla_inplace": "fla", "previous": "fla", "torch": "torch"}[variant]
    return fn(**x, norm_eps=1e-5, backend=backend)


def rel(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(kind: str, variant: str, x: dict[str, Any]) -> dict[str, float]:
    """Output / state error of ``variant`` against the torch composition, on clones of the same inputs."""
    ref_x = {k: v.clone() for k, v in x.items()}
    new_x = {k: v.clone() for k, v in x.items()}
    ref = run_variant(kind, "torch", ref_x)
    out = run_variant(kind, variant, new_x)
    return {"rel_err_out": rel(out, ref), "rel_err_state": rel(new_x["state"], ref_x["state"])}


def time_graph(fn: Callable[[], Any], device: Any, replays: int) -> list[float]:
    """Capture ``fn`` in a CUDA graph (after warm-up on a side stream); ms per replay."""
    import torch

    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return times


def copy_bandwidth(device: Any) -> float:
    """Eager device-to-device copy bandwidth (bytes read + written), as the whole-model benchmarks measure it.

    Not inside a CUDA graph: the first run captured the copy in a graph and got 2767 GB/s on the H200, against
    4262 GB/s for the eager copy in the whole-model runs (probably a graph memcpy node served by the copy engines
    instead of an SM copy kernel), so results/decode_kernels_h200.json's ``fraction_of_copy`` reads ~1.54x high.
    """
    from placement_search.evaluators.throughput import copy_bandwidth_gbps

    return copy_bandwidth_gbps(device)


def versions() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for mod in ("triton", "fla"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # absent (fla on CPU) or no version attribute
            out[mod] = f"unavailable: {type(e).__name__}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--tiny", action="store_true", help="small sizes (with --device cpu: Triton's interpreter)"
    )
    ap.add_argument("--batches", default=None, help="comma-separated (default: 1,16,64,256,1024; CPU: 1,3)")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default="results")
    ap.add_argument("--variants", default=None, help="comma-separated (default: fused, fla_inplace, previous and "
                    "the tile sweep; fused_bv<N>[_w<W>] for any tile)")  # fmt: skip
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    from placement_search.files import write_json_atomic

    device = torch.device(args.device)
    default_batches = [1, 3] if cpu else list(BATCHES)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else default_batches
    variants = ["fused", "torch"] if cpu else ["fused", "fla_inplace", "previous", *FUSED_SWEEP]
    if args.variants:
        variants = args.variants.split(",")
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.time()
    copy_gbps = None if cpu else copy_bandwidth(device)
    sizes = _sizes(args.tiny)
    rows: list[dict[str, Any]] = []
    for kind in ("gdn", "kda"):
        make = make_gdn if kind == "gdn" else make_kda
        for B in batches:
            probe = make(B, sizes[kind], device, torch.bfloat16, gen)
            nbytes = step_bytes(probe)
            sets = 1 if cpu else max(1, min(MAX_SETS, -(-L2_ROTATE_BYTES // nbytes)))
            inputs = [probe] + [make(B, sizes[kind], device, torch.bfloat16, gen) for _ in range(sets - 1)]
            for variant in variants:
                row: dict[str, Any] = {
                    "mixer": kind,
                    "batch": B,
                    "variant": variant,
                    "bytes": nbytes,
                    "sets": sets,
                }
                try:
                    row.update(check(kind, variant, probe))
                    if cpu:
                        t = time.perf_counter()
                        run_variant(kind, variant, probe)
                        times = [(time.perf_counter() - t) * 1e3]
                    else:

                        def all_sets(variant: str = variant, kind: str = kind, inputs: list = inputs) -> None:
                            for x in inputs:
                                run_variant(kind, variant, x)

                        times = [t / sets for t in time_graph(all_sets, device, args.replays)]
                    row["us"] = statistics.median(times) * 1e3
                    row["us_p10_p90"] = (
                        [float(v * 1e3) for v in statistics.quantiles(times, n=10)[::8]]
                        if len(times) > 2
                        else None
                    )
                    row["gbps"] = nbytes / (row["us"] / 1e6) / 1e9
                    row["fraction_of_copy"] = row["gbps"] / copy_gbps if copy_gbps else None
                except Exception as e:  # report and continue: one failing variant must not lose the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                frac = row.get("fraction_of_copy")
                print(
                    f"{kind} B={B:>5} {variant:>12}: "
                    + (f"error {row['error']}" if "error" in row else
                       f"{row['us']:9.1f} us {row['gbps']:8.1f} GB/s {'' if frac is None else f'{100 * frac:5.1f}% of copy'}"
                       f"  err o {row['rel_err_out']:.1e} state {row['rel_err_state']:.1e}"),
                    flush=True,
                )  # fmt: skip
            del inputs, probe
            if not cpu:
                torch.cuda.empty_cache()
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if not cpu else "cpu (Triton interpreter)",
        "host": platform.node(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "sizes": sizes,
        "copy_gbps": copy_gbps,
        "wall_s": time.time() - t0,
        **versions(),
    }
    print(f"\ncopy bandwidth {copy_gbps or float('nan'):.0f} GB/s (read+write); wall {meta['wall_s']:.0f} s")
    print(f"{'mixer':>5} {'B':>5} " + " ".join(f"{v + ' us':>16} {'%copy':>6}" for v in variants))
    for kind in ("gdn", "kda"):
        for B in batches:
            cells = []
            for v in variants:
                r = next(
                    (r for r in rows if r["mixer"] == kind and r["batch"] == B and r["variant"] == v), {}
                )
                us, frac = r.get("us"), r.get("fraction_of_copy")
                cells.append(
                    f"{'err' if us is None else f'{us:.1f}':>16} {'' if frac is None else f'{100 * frac:.1f}':>6}"
                )
            print(f"{kind:>5} {B:>5} " + " ".join(cells))
    tag = "cpu_tiny" if cpu else torch.cuda.get_device_name(device).split()[-1].lower()
    path = write_json_atomic(Path(args.out) / f"decode_kernels_{tag}.json", {"meta": meta, "rows": rows})
    print(f"-> {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
