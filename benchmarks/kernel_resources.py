#!/usr/bin/env python3
"""Registers, spills and shared memory of our decode kernels compiled for the H200 (sm_90), on any machine.

Triton compiles a kernel for a target without a GPU (``triton.compile`` with a ``GPUTarget``; ``ptxas`` ships in
the triton wheel), and ``cuobjdump -res-usage`` (shipped too) reads the cubin's registers per thread and stack
(spill) bytes. From them and the warps: how many programs one SM holds (65536 registers, allocated per warp in
units of 256; at most 64 warps, 32 programs and 228 KiB of shared memory an SM). A kernel's occupancy decides how
many of its state tiles or weight streams are in flight, which is what the decode kernels' speed hangs on: the GDN
state kernel at 159 registers holds 3 programs an SM, at 203 (session 12's finish behind an arrival counter) 2,
and was 20-30% slower for it (``results/decode_kernels_ff_h200.json``).

The kernels are compiled as the runtime launches them at Super Apriel 15B sizes (pointers and strides 16-byte
aligned, as Triton's launcher specialises them; PDL on). The registers come from this machine's Triton, which may
differ from the GPU machine's by a few (the H200 runs triton 3.6).

    python benchmarks/kernel_resources.py --out results/kernel_resources_sm90.json

Writes JSON (Triton version, date, command, one row per kernel) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the runtime's Triton has (3.6)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from placement_search.files import write_json_atomic
from placement_search.kernels import _fused_decode_triton as FD
from placement_search.kernels import _projection_triton as PT
from placement_search.kernels import fused_decode as fused
from placement_search.kernels.projection import ROPE_CONFIG, skinny_config, split_for

TARGET = GPUTarget("cuda", 90, 32)
SM_REGS, SM_WARPS, SM_PROGRAMS, SM_SHARED = 65536, 64, 32, 228 * 1024
#: pointer arguments that are not bf16
POINTER_TYPES = {"state_ptr": "*fp32", "ws_ptr": "*fp32", "ss_ptr": "*fp32", "ssp_ptr": "*fp32", "lock_ptr": "*i32",
                 "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64"}  # fmt: skip
FLOAT_ARGS = {"scale", "eps"}
GDN = {"HK": 8, "HV": 32, "DK": 128, "DV": 128, "KW": 4, "KWP": 4}


#: strides that are 1 at 15B sizes (Triton's launcher compiles an integer argument equal to 1 as the constant 1)
UNIT_STRIDES = {"s_cs_k", "s_w_k"}
#: strides that are not multiples of 16 (the conv state's and weight's channel strides: KW - 1 = 3, KW = 4)
ODD_STRIDES = {"s_cs_c", "s_w_c"}


def _signature(fn: Any, consts: dict[str, Any]) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    """Triton signature of ``fn`` (constexprs from ``consts`` and :data:`UNIT_STRIDES`, pointers bf16 unless
    :data:`POINTER_TYPES` says, ``FLOAT_ARGS`` fp32, the rest i32) and the 16-divisibility attributes the launcher
    gives its pointers and strides at 15B sizes."""
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        if param.is_constexpr and name not in consts:  # typed as a runtime i32, it would compile every branch
            raise ValueError(f"{fn.__name__}: constexpr {name} has no value in the case")
        if name in consts or name in UNIT_STRIDES:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTER_TYPES.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
            if name.startswith("s_") and name not in ODD_STRIDES:  # row strides: multiples of 16 elements here
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resources(fn: Any, consts: dict[str, Any], num_warps: int) -> dict[str, int]:
    """Compile ``fn`` for sm_90 with ``consts`` and read its registers, stack and shared memory."""
    sig, attrs = _signature(fn, consts)
    consts = {**consts, **{name: 1 for name in UNIT_STRIDES if name in fn.arg_names}}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                            options={"num_warps": num_warps})  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {fn.__name__}: {out[:200]!r}")
    regs, stack, static_shared = (int(g) for g in m.groups())
    shared = max(static_shared, int(kernel.metadata.shared))
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": shared, "num_warps": num_warps,
            "programs_per_sm": programs_per_sm(regs, num_warps, shared)}  # fmt: skip


def programs_per_sm(regs: int, num_warps: int, shared: int) -> int:
    """Programs of ``num_warps`` warps one sm_90 SM holds at ``regs`` registers a thread and ``shared`` bytes."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // num_warps
    by_shared = SM_SHARED // (shared + 1024) if shared else SM_PROGRAMS  # 1 KiB reserved per program
    return min(by_regs, SM_WARPS // num_warps, SM_PROGRAMS, by_shared)


def _skinny_consts(gated: bool, residual: bool, norm: bool, pdl: int = 1) -> dict[str, Any]:
    """``skinny_linear_kernel``'s constexprs for a launch at 16 rows; the arguments that launch leaves unused are
    ``None`` (constexpr), as the runtime passes them."""
    consts: dict[str, Any] = {
        "BM": 16, "GATED": gated, "RESIDUAL": residual, "HAS_BIAS": False, "EVEN_K": True, "UPCAST": False,
        "PDL": pdl, "PREFETCH": 0, "NORM": norm, "SSB": 64, "NORM_OUT": residual, "GROUPED": False,
        "b_ptr": None, "n1": None, "x2_off": None, "pf_ptr": None, "pf_n": None, "PF_ELEMS": 32, "PF_LINES": 0,
        "ROPE": False, "HD": 128,
        **dict.fromkeys(("nq", "nk", "cos_ptr", "sin_ptr", "s_tab", "slot_ptr", "kc_ptr", "vc_ptr", "s_cb", "s_cs",
                         "s_ch")),
    }  # fmt: skip
    unused = []
    if not gated:
        unused += ["w2_ptr", "s_w2n"]
    if not residual:  # the output projections add the residual and write the next norm's inputs (NORM_OUT)
        unused += ["r_ptr", "s_rm", "gn_ptr", "hg_ptr", "s_hg", "ssp_ptr"]
    if not norm:
        unused += ["ss_ptr", "nss", "eps"]
    return {**consts, **dict.fromkeys(unused)}


def cases(pdl: int = 1) -> list[tuple[str, Any, dict[str, Any], int]]:
    """(name, kernel, constexprs, warps) as the runtime launches them at 15B sizes, compiled with ``PDL = pdl``
    (``kernels.backend.PDL_MODES``; 1: the runtime's)."""
    runtime = {"PDL": pdl, "STREAM": False, "AHEAD": 0, "EARLY": False,  # the state kernels' defaults
               "WIDE": fused.STATE_WIDE_ADDRESSES}  # fmt: skip
    state = {**GDN, "BK": 128, "L2_EPS": 1e-6, **runtime}
    kda = {"H": 32, "D": 128, "BD": 128, "KW": 4, "KWP": 4, "L2_EPS": 1e-6, **runtime}
    out = []
    for pre in (False, True):
        for bv, rows in ((32, 1), (64, fused.SMALL_BATCH)):  # below SMALL_BATCH rows / from there
            vfirst = fused._state_grid(rows, 1, 1)[1]  # the grid's order at those rows
            tag = f"BV={bv}{', PRECONV' if pre else ''}{', VFIRST' if vfirst else ''}"
            kw = {"BV": bv, "PRECONV": pre, "VFIRST": vfirst}
            out.append((f"gdn_state_kernel {tag}", FD.gdn_state_kernel, {**state, **kw}, 4))
            out.append((f"kda_state_kernel {tag}", FD.kda_state_kernel, {**kda, **kw}, 4))
    # SHIFT: the q/k conv states shifted here, as below fused.PRECONV_MIN_ROWS rows
    finish = {**GDN, "QK_PER": 64, "BV": 128, "BQ": 64, "NORM_EPS": 1e-5, "PDL": pdl, "SHIFT": True}
    out.append(("gdn_finish_kernel", FD.gdn_finish_kernel, finish, 4))
    out.append(("kda_finish_kernel", FD.kda_finish_kernel,
                {"D": 128, "BD": 128, "KW": 4, "KWP": 4, "NORM_EPS": 1e-5, "PDL": pdl, "SHIFT": True}, 4))  # fmt: skip
    conv = {"BR": 2, "BC": 512, "KW": 4, "PDL": pdl}
    out.append(("conv_update_kernel 2 x 512", FD.conv_update_kernel, conv, 4))
    for name, (n, k, gated, residual, norm) in (
        ("GDN in [10304, 5120]", (10304, 5120, False, False, True)),
        ("o_proj [5120, 4096]", (5120, 4096, False, True, False)),
        ("gate/up [2 x 14336, 5120]", (14336, 5120, True, False, True)),
        ("down [5120, 14336]", (5120, 14336, False, True, False)),
        ("LM head [131072, 5120]", (131072, 5120, False, False, True)),
    ):
        cfg = skinny_config(n, k, gated, residual)
        split = cfg["SPLIT"] or split_for(n, k, cfg["BN"], bk=cfg["BK"])
        consts = {**_skinny_consts(gated, residual, norm, pdl), "BN": cfg["BN"], "BK": cfg["BK"],
                  "STAGES": cfg["STAGES"], "SPLIT": split}  # fmt: skip
        label = f"skinny_linear_kernel {name} {cfg['BN']}x{cfg['BK']}x{cfg['STAGES']}, SPLIT {split}"
        out.append((label, PT.skinny_linear_kernel, consts, cfg["num_warps"]))
    # the attention q/k/v projection with RoPE and the cache write (kernels.projection.linear_rope_cache)
    cfg = ROPE_CONFIG
    rope = {**_skinny_consts(False, False, True, pdl), "BN": cfg["BN"], "BK": cfg["BK"], "STAGES": cfg["STAGES"],
            "SPLIT": 1, "ROPE": True}  # fmt: skip
    for arg in ("w2_ptr", "s_w2n", "nq", "nk", "cos_ptr", "sin_ptr", "s_tab", "slot_ptr", "kc_ptr", "vc_ptr", "s_cb",
                "s_cs", "s_ch"):  # fmt: skip
        rope.pop(arg)
    label = f"skinny_linear_kernel q/k/v + RoPE [6144, 5120] {rope['BN']} pairs x{cfg['BK']}x{cfg['STAGES']}"
    out.append((label, PT.skinny_linear_kernel, rope, cfg["num_warps"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--pdl-mode", type=int, default=1, choices=(1, 2, 3),
                    help="the PDL constexpr compiled in (kernels.backend.PDL_MODES; 1: the runtime's)")  # fmt: skip
    args = ap.parse_args(argv)
    rows = []
    print(f"{'kernel':66} {'warps':>5} {'regs':>5} {'stack':>6} {'shared':>7} {'per SM':>6}")
    for name, fn, consts, warps in cases(args.pdl_mode):
        r = {"kernel": name, **resources(fn, consts, warps)}
        rows.append(r)
        print(f"{name:66} {warps:>5} {r['registers']:>5} {r['stack_bytes']:>6} {r['shared_bytes']:>7} "
              f"{r['programs_per_sm']:>6}", flush=True)  # fmt: skip
    if args.out:
        write_json_atomic(Path(args.out), {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "target": "cuda sm_90 (H200), compiled on this machine", "triton": triton.__version__,
            "pdl_mode": args.pdl_mode, "rows": rows,
        })  # fmt: skip
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
