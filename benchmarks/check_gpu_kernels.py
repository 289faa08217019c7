#!/usr/bin/env python3
"""Check every GPU path of ``placement_search.kernels`` against the pure-PyTorch reference.

For each op and GPU path (SDPA / FlexAttention full and windowed attention, attention_decode, fla GDN chunk and
fused-recurrent step with grouped heads, fla KDA chunk and step, conv prefill and update, RMSNorm, RoPE) the
inputs are fresh random tensors in bf16 at Super Apriel 15B sizes; the reference runs the CPU code path (explicit
fp32 softmax, pure-torch chunked/recurrent delta rule, fp32 conv) in float32 on the SAME bf16-rounded inputs (on
the GPU, to save time: it is the same torch code as on CPU). Reported: max abs error, relative error
``||a - b|| / ||b||`` and pass/fail against ``--tol``.

Tolerance: bf16 has an 8-bit significand (unit roundoff 2^-8 ~ 3.9e-3). Outputs are rounded to bf16 once
(~2e-3 relative in norm) and the GPU kernels keep some intermediates in bf16 (attention probabilities, the WY/UT
matrices and chunk states of fla's chunked delta rule), each adding errors of the same order that accumulate
mildly over chunks, so a correct kernel lands around 3e-3..1e-2. A convention bug (gate sign, beta/g order,
missing L2 norm, wrong scale, wrong head grouping, off-by-one window) gives relative errors of order 0.1..1.
``--tol 2e-2`` separates the two with margin.

Usage: python benchmarks/check_gpu_kernels.py [--out results/gpu_kernel_check.json] [--small] [--device cpu]
Exit status 1 if any check fails (or errors).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from placement_search import kernels as K
from placement_search.kernels.backend import fla_available


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def timed(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    """Median wall time in ms of ``fn`` after one warm-up (already done by the caller's first run)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


class Checker:
    def __init__(self, tol: float, device: torch.device, out: Path, meta: dict[str, Any]) -> None:
        self.tol = tol
        self.device = device
        self.out = out
        self.meta = meta
        self.rows: list[dict[str, Any]] = []

    def record(
        self,
        op: str,
        path: str,
        shape: str,
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
        ms: float | None = None,
        tol: float | None = None,
    ) -> None:
        tol = self.tol if tol is None else tol
        for what, (got, ref) in pairs.items():
            finite = bool(torch.isfinite(got.float()).all())
            row = {
                "op": op,
                "path": path,
                "output": what,
                "shape": shape,
                "max_abs_err": max_abs(got, ref),
                "rel_err": rel_err(got, ref),
                "tol_rel": tol,
                "gpu_ms": ms,
            }
            row["pass"] = finite and row["rel_err"] <= tol
            self.rows.append(row)
            status = "PASS" if row["pass"] else "FAIL"
            ms_s = "" if ms is None else f"{ms:9.3f}"
            print(
                f"{op:22s} {path:34s} {what:6s} {row['max_abs_err']:10.3e} {row['rel_err']:10.3e} "
                f"{tol:8.1e} {status:4s} {ms_s}  {shape}",
                flush=True,
            )
        self.flush()

    def error(self, op: str, exc: BaseException) -> None:
        self.rows.append(
            {"op": op, "path": "-", "output": "-", "shape": "-", "error": repr(exc), "pass": False}
        )
        print(f"{op:22s} ERROR {exc!r}", flush=True)
        traceback.print_exc()
        self.flush()

    def flush(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        ok = all(r["pass"] for r in self.rows)
        self.out.write_text(json.dumps({**self.meta, "all_pass": ok, "checks": self.rows}, indent=2))


def make_gdn_inputs(
    B: int, T: int, HK: int, HV: int, D: int, dtype: torch.dtype, dev: torch.device, step: bool = False
) -> dict[str, torch.Tensor]:
    """Realistic GDN inputs: gates from gdn_gate with A_log = log U(1, 16), dt ~ logU(1e-3, 1e-1)."""
    lead = (B,) if step else (B, T)
    q = torch.randn(*lead, HK, D, device=dev).to(dtype)
    k = torch.randn(*lead, HK, D, device=dev).to(dtype)
    v = torch.randn(*lead, HV, D, device=dev).to(dtype)
    A_log = torch.empty(HV, device=dev).uniform_(1, 16).log()
    dt_ = torch.exp(torch.empty(HV, device=dev).uniform_(math.log(1e-3), math.log(1e-1)))
    dt_bias = dt_ + torch.log(-torch.expm1(-dt_))  # inverse softplus
    a = torch.randn(*lead, HV, device=dev).to(dtype)
    g = K.gdn_gate(a, A_log, dt_bias)
    beta = torch.randn(*lead, HV, device=dev).to(dtype).sigmoid()
    h0 = 0.1 * torch.randn(B, HV, D, D, device=dev)
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "h0": h0}


def make_kda_inputs(
    B: int, T: int, H: int, D: int, dtype: torch.dtype, dev: torch.device, step: bool = False
) -> dict[str, torch.Tensor]:
    lead = (B,) if step else (B, T)
    q = torch.randn(*lead, H, D, device=dev).to(dtype)
    k = torch.randn(*lead, H, D, device=dev).to(dtype)
    v = torch.randn(*lead, H, D, device=dev).to(dtype)
    A_log = torch.empty(H, device=dev).uniform_(1, 16).log()
    dt_ = torch.exp(torch.empty(H * D, device=dev).uniform_(math.log(1e-3), math.log(1e-1)))
    dt_bias = dt_ + torch.log(-torch.expm1(-dt_))
    f = torch.randn(*lead, H * D, device=dev).to(dtype)
    g = K.kda_gate(f, A_log, dt_bias, H)
    beta = torch.randn(*lead, H, device=dev).to(dtype).sigmoid()
    h0 = 0.1 * torch.randn(B, H, D, D, device=dev)
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "h0": h0}


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/gpu_kernel_check.json")
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative error ||a-b||/||b|| for bf16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--cache-len", type=int, default=4096)
    ap.add_argument(
        "--small", action="store_true", help="tiny sizes (smoke test of this script, e.g. on CPU)"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    # 15B sizes: attention H=32, Hkv=8, D=128; GDN HK=8, HV=32, DK=DV=128; KDA H=32, D=128; conv K=4.
    H, HKV, D, HK, HV, KCONV = 32, 8, 128, 8, 32, 4
    B, T, W, BD, S = args.batch, args.seqlen, args.window, args.decode_batch, args.cache_len
    if args.small:
        H, HKV, D, HK, HV = 4, 2, 32, 2, 4
        B, T, W, BD, S = 2, 200, 48, 3, 96
    bf = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    on_gpu = dev.type == "cuda"
    has_fla = on_gpu and fla_available()
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = None
    try:
        import fla

        fla_v = getattr(fla, "__version__", "unknown")
    except Exception:
        fla_v = None
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name(dev) if on_gpu else None,
        "device": str(dev),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_v,
        "fla": fla_v,
        "tolerance_rel": args.tol,
        "tolerance_note": "relative error ||a-b||/||b|| of bf16 GPU path vs fp32 torch reference on the same "
        "bf16-rounded inputs; bf16 unit roundoff 3.9e-3, convention bugs give >= 0.1",
        "sizes": {
            "B": B,
            "T": T,
            "window": W,
            "decode_B": BD,
            "cache_len": S,
            "H": H,
            "Hkv": HKV,
            "D": D,
            "gdn_HK": HK,
            "gdn_HV": HV,
            "conv_K": KCONV,
        },
    }
    chk = Checker(args.tol, dev, Path(args.out), meta)
    print(
        f"{'op':22s} {'path':34s} {'out':6s} {'max_abs':>10s} {'rel':>10s} {'tol':>8s} stat {'ms':>9s}  shape"
    )
    scale = D**-0.5

    # ---------------- attention prefill (full causal and sliding window) ----------------
    try:
        q = torch.randn(B, T, H, D, device=dev).to(bf)
        k = torch.randn(B, T, HKV, D, device=dev).to(bf)
        v = torch.randn(B, T, HKV, D, device=dev).to(bf)
        shape = f"q[{B},{T},{H},{D}] kv[{B},{T},{HKV},{D}]"
        for window in (None, W):
            ref = K.attention(f32(q), f32(k), f32(v), scale=scale, window=window, backend="reference")
            paths = ["sdpa", "flex"] if on_gpu else ["sdpa"]
            for p in paths:
                try:
                    out = K.attention(q, k, v, scale=scale, window=window, backend=p)
                    ms = timed(
                        lambda p=p, window=window: K.attention(
                            q, k, v, scale=scale, window=window, backend=p
                        ),
                        dev,
                    )
                    name = "attention" if window is None else f"attention_swa(W={window})"
                    label = {
                        "sdpa": "SDPA" + (" causal cuDNN-first" if window is None else " dense mask"),
                        "flex": "FlexAttention block mask",
                    }[p]
                    chk.record(name, label, shape, {"o": (out, ref)}, ms)
                except Exception as exc:
                    chk.error(f"attention[{p},W={window}]", exc)
            del ref
    except Exception as exc:
        chk.error("attention", exc)

    # ---------------- attention decode: full cache with ragged lengths, and a full SWA ring ----------------
    try:
        for label, cache_len, fill in (("full cache", S, "ragged"), (f"SWA ring W={W}", W, "full")):
            qd = torch.randn(BD, 1, H, D, device=dev).to(bf)
            kc = torch.randn(BD, cache_len, HKV, D, device=dev).to(bf)
            vc = torch.randn(BD, cache_len, HKV, D, device=dev).to(bf)
            if fill == "ragged":
                lens = torch.randint(1, cache_len + 1, (BD,), device=dev)
                valid = torch.arange(cache_len, device=dev)[None] < lens[:, None]
            else:
                valid = torch.ones(BD, cache_len, dtype=torch.bool, device=dev)
            ref = K.attention_decode(f32(qd), f32(kc), f32(vc), valid, scale=scale, backend="reference")
            out = K.attention_decode(qd, kc, vc, valid, scale=scale, backend="sdpa")
            ms = timed(
                lambda qd=qd, kc=kc, vc=vc, valid=valid: K.attention_decode(qd, kc, vc, valid, scale=scale),
                dev,
            )
            # the alternative formulation (query heads grouped per KV head, no enable_gqa)
            out_g = K.attention_decode(qd, kc, vc, valid, scale=scale, backend="sdpa_grouped")
            ms_g = timed(
                lambda qd=qd, kc=kc, vc=vc, valid=valid: K.attention_decode(
                    qd, kc, vc, valid, scale=scale, backend="sdpa_grouped"
                ),
                dev,
            )
            chk.record(
                "attention_decode",
                f"sdpa_grouped: SDPA grouped MQA ({label})",
                f"q[{BD},1,{H},{D}] cache[{BD},{cache_len},{HKV},{D}]",
                {"o": (out_g, ref)},
                ms_g,
            )
            # the split-K Triton kernel (bf16 tensor-core dots: only checkable here, not in the CPU interpreter)
            out_t = K.attention_decode(qd, kc, vc, valid, scale=scale, backend="triton")
            ms_t = timed(
                lambda qd=qd, kc=kc, vc=vc, valid=valid: K.attention_decode(
                    qd, kc, vc, valid, scale=scale, backend="triton"
                ),
                dev,
            )
            chk.record(
                "attention_decode",
                f"triton: split-K flash decoding ({label})",
                f"q[{BD},1,{H},{D}] cache[{BD},{cache_len},{HKV},{D}]",
                {"o": (out_t, ref)},
                ms_t,
            )
            # the same given the rows' lengths (the valid slots are a prefix): NaN past each length, so that any
            # read of a slot past it would show in the output
            lengths = valid.sum(1).to(torch.int32)
            kn, vn = (c.masked_fill(~valid[:, :, None, None], float("nan")) for c in (kc, vc))
            out_l = K.attention_decode(qd, kn, vn, valid, scale=scale, backend="triton", lengths=lengths)
            ms_l = timed(
                lambda qd=qd, kn=kn, vn=vn, valid=valid, lengths=lengths: K.attention_decode(
                    qd, kn, vn, valid, scale=scale, backend="triton", lengths=lengths
                ),
                dev,
            )
            chk.record(
                "attention_decode",
                f"triton: split-K flash decoding, rows' lengths, NaN past them ({label})",
                f"q[{BD},1,{H},{D}] cache[{BD},{cache_len},{HKV},{D}]",
                {"o": (out_l, ref)},
                ms_l,
            )
            chk.record(
                "attention_decode",
                f"sdpa: SDPA enable_gqa bool mask ({label})",
                f"q[{BD},1,{H},{D}] cache[{BD},{cache_len},{HKV},{D}]",
                {"o": (out, ref)},
                ms,
            )
    except Exception as exc:
        chk.error("attention_decode", exc)

    # ---------------- GDN prefill (fla chunk) ----------------
    lin = "fla" if has_fla else "chunk"
    try:
        x = make_gdn_inputs(B, T, HK, HV, D, bf, dev)
        o_ref, s_ref = K.gated_delta_rule(
            f32(x["q"]),
            f32(x["k"]),
            f32(x["v"]),
            x["g"],
            f32(x["beta"]),
            initial_state=x["h0"],
            output_final_state=True,
            backend="chunk",
        )
        o, s = K.gated_delta_rule(
            x["q"],
            x["k"],
            x["v"],
            x["g"],
            x["beta"],
            initial_state=x["h0"],
            output_final_state=True,
            backend=lin,
        )
        ms = timed(
            lambda: K.gated_delta_rule(
                x["q"],
                x["k"],
                x["v"],
                x["g"],
                x["beta"],
                initial_state=x["h0"],
                output_final_state=True,
                backend=lin,
            ),
            dev,
        )
        chk.record(
            "gated_delta_rule",
            f"{lin} chunk_gated_delta_rule (HV=4*HK, h0)",
            f"q[{B},{T},{HK},{D}] v[{B},{T},{HV},{D}]",
            {"o": (o, o_ref), "state": (s, s_ref)},
            ms,
        )
        if has_fla:  # the gated delta rule through fla's KDA kernels (devnet training and evaluation path)
            o2, s2 = K.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                        output_final_state=True, backend="fla_kda")  # fmt: skip
            ms2 = timed(lambda: K.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                                   output_final_state=True, backend="fla_kda"), dev)  # fmt: skip
            chk.record("gated_delta_rule", "fla_kda: chunk_kda on gdn_as_kda inputs (HV=4*HK, h0)",
                       f"q[{B},{T},{HK},{D}] v[{B},{T},{HV},{D}]", {"o": (o2, o_ref), "state": (s2, s_ref)}, ms2)  # fmt: skip
        # prefill T-1 tokens with the GPU chunk kernel, then one fused-recurrent step: equals the full reference
        _, s_p = K.gated_delta_rule(
            x["q"][:, :-1],
            x["k"][:, :-1],
            x["v"][:, :-1],
            x["g"][:, :-1],
            x["beta"][:, :-1],
            initial_state=x["h0"],
            output_final_state=True,
            backend=lin,
        )
        o_last = K.gated_delta_rule_step(
            x["q"][:, -1], x["k"][:, -1], x["v"][:, -1], x["g"][:, -1], x["beta"][:, -1], s_p, backend=lin
        )
        chk.record(
            "gated_delta_rule",
            f"{lin} chunk(T-1) + step",
            f"T={T}",
            {"o_last": (o_last, o_ref[:, -1]), "state": (s_p, s_ref)},
        )
        del x, o_ref, s_ref, o, s
    except Exception as exc:
        chk.error("gated_delta_rule", exc)

    # ---------------- GDN decode step (fla fused recurrent) ----------------
    try:
        x = make_gdn_inputs(BD, 1, HK, HV, D, bf, dev, step=True)
        st_ref = x["h0"].clone()
        o_ref = K.gated_delta_rule_step(
            f32(x["q"]), f32(x["k"]), f32(x["v"]), x["g"], f32(x["beta"]), st_ref, backend="naive"
        )
        st = x["h0"].clone()
        o = K.gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], st, backend=lin)
        st2 = x["h0"].clone()
        ms = timed(
            lambda: K.gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], st2, backend=lin), dev
        )
        chk.record(
            "gated_delta_rule_step",
            f"{lin} " + ("fused_recurrent (copy_ into state)" if lin == "fla" else "torch step (in place)"),
            f"q[{BD},{HK},{D}] v[{BD},{HV},{D}]",
            {"o": (o, o_ref), "state": (st, st_ref)},
            ms,
        )
    except Exception as exc:
        chk.error("gated_delta_rule_step", exc)

    # ---------------- KDA prefill and step ----------------
    try:
        x = make_kda_inputs(B, T, H, D, bf, dev)
        o_ref, s_ref = K.kda(
            f32(x["q"]),
            f32(x["k"]),
            f32(x["v"]),
            x["g"],
            f32(x["beta"]),
            initial_state=x["h0"],
            output_final_state=True,
            backend="chunk",
        )
        o, s = K.kda(
            x["q"],
            x["k"],
            x["v"],
            x["g"],
            x["beta"],
            initial_state=x["h0"],
            output_final_state=True,
            backend=lin,
        )
        ms = timed(
            lambda: K.kda(
                x["q"],
                x["k"],
                x["v"],
                x["g"],
                x["beta"],
                initial_state=x["h0"],
                output_final_state=True,
                backend=lin,
            ),
            dev,
        )
        chk.record(
            "kda", f"{lin} chunk_kda (h0)", f"q[{B},{T},{H},{D}]", {"o": (o, o_ref), "state": (s, s_ref)}, ms
        )
        _, s_p = K.kda(
            x["q"][:, :-1],
            x["k"][:, :-1],
            x["v"][:, :-1],
            x["g"][:, :-1],
            x["beta"][:, :-1],
            initial_state=x["h0"],
            output_final_state=True,
            backend=lin,
        )
        o_last = K.kda_step(
            x["q"][:, -1], x["k"][:, -1], x["v"][:, -1], x["g"][:, -1], x["beta"][:, -1], s_p, backend=lin
        )
        chk.record(
            "kda",
            f"{lin} chunk(T-1) + step",
            f"T={T}",
            {"o_last": (o_last, o_ref[:, -1]), "state": (s_p, s_ref)},
        )
        del x, o_ref, s_ref, o, s
    except Exception as exc:
        chk.error("kda", exc)
    try:
        x = make_kda_inputs(BD, 1, H, D, bf, dev, step=True)
        st_ref = x["h0"].clone()
        o_ref = K.kda_step(
            f32(x["q"]), f32(x["k"]), f32(x["v"]), x["g"], f32(x["beta"]), st_ref, backend="naive"
        )
        st = x["h0"].clone()
        o = K.kda_step(x["q"], x["k"], x["v"], x["g"], x["beta"], st, backend=lin)
        st2 = x["h0"].clone()
        ms = timed(lambda: K.kda_step(x["q"], x["k"], x["v"], x["g"], x["beta"], st2, backend=lin), dev)
        chk.record(
            "kda_step",
            f"{lin} " + ("fused_recurrent_kda (in place)" if lin == "fla" else "torch step (in place)"),
            f"q[{BD},{H},{D}]",
            {"o": (o, o_ref), "state": (st, st_ref)},
            ms,
        )
    except Exception as exc:
        chk.error("kda_step", exc)

    # ---------------- conv (torch on GPU in bf16 vs fp32), RMSNorm, RoPE ----------------
    try:
        C = 2 * HK * D + HV * D
        xc = torch.randn(B, T, C, device=dev).to(bf)
        wc = (0.5 * torch.randn(C, KCONV, device=dev)).to(bf)
        st0 = torch.randn(B, C, KCONV - 1, device=dev).to(bf)
        y_ref, f_ref = K.causal_conv1d(f32(xc), f32(wc), initial_state=f32(st0))
        y, fs = K.causal_conv1d(xc, wc, initial_state=st0)
        ms = timed(lambda: K.causal_conv1d(xc, wc, initial_state=st0), dev)
        chk.record(
            "causal_conv1d",
            "torch conv1d (bf16 io)",
            f"x[{B},{T},{C}] K={KCONV}",
            {"y": (y, y_ref), "state": (fs, f_ref)},
            ms,
        )
        xs = torch.randn(BD, C, device=dev).to(bf)
        cs = torch.randn(BD, C, KCONV - 1, device=dev).to(bf)
        cs_ref = f32(cs).clone()
        y_ref = K.causal_conv1d_update(f32(xs), cs_ref, f32(wc))
        cs_gpu = cs.clone()
        y = K.causal_conv1d_update(xs, cs_gpu, wc)
        cs2 = cs.clone()
        ms = timed(lambda: K.causal_conv1d_update(xs, cs2, wc), dev)
        chk.record(
            "causal_conv1d_update",
            "torch (in place, bf16 io)",
            f"x[{BD},{C}] K={KCONV}",
            {"y": (y, y_ref), "state": (cs_gpu, cs_ref)},
            ms,
        )
    except Exception as exc:
        chk.error("causal_conv1d", exc)
    try:
        hid = 5120 if not args.small else 64
        xn = torch.randn(B, T, hid, device=dev).to(bf)
        wn = (1 + 0.1 * torch.randn(hid, device=dev)).to(bf)
        ref = F.rms_norm(f32(xn), (hid,), eps=1e-5) * f32(wn)
        chk.record(
            "rms_norm",
            "torch fp32 then cast",
            f"x[{B},{T},{hid}]",
            {"y": (K.rms_norm(xn, wn, 1e-5), ref)},
            timed(lambda: K.rms_norm(xn, wn, 1e-5), dev),
        )
        pos = torch.arange(T, device=dev)
        cos, sin = K.rope_cos_sin(pos, D, 1e6, dtype=bf, device=dev)
        cos32, sin32 = K.rope_cos_sin(pos, D, 1e6, dtype=torch.float32, device=dev)
        xr = torch.randn(B, T, H, D, device=dev).to(bf)
        ref = K.apply_rope(f32(xr), cos32, sin32)
        chk.record(
            "apply_rope",
            "torch rotate-half (bf16 tables)",
            f"x[{B},{T},{H},{D}]",
            {"y": (K.apply_rope(xr, cos, sin), ref)},
            timed(lambda: K.apply_rope(xr, cos, sin), dev),
        )
    except Exception as exc:
        chk.error("norm/rope", exc)
    # ------- decode projections around an RMSNorm (skinny Triton kernel: NORM_OUT producer, NORM consumer) -------
    try:
        hid, inner = (64, 48) if args.small else (5120, 4096)
        for rows in (1, 16):
            o = torch.randn(rows, inner, device=dev).to(bf)
            wo = (torch.randn(hid, inner, device=dev) * inner**-0.5).to(bf)
            res = (3 * torch.randn(rows, hid, device=dev)).to(bf)
            wn = (1 + 0.1 * torch.randn(hid, device=dev)).to(bf)
            h_ref = f32(res) + f32(o) @ f32(wo).T
            normed = K.linear(o, wo, residual=res, next_norm_weight=wn, backend="triton")
            outs = {"h": (normed.x, h_ref), "h*g": (normed.xg, h_ref * f32(wn))}
            outs["sumsq"] = (normed.sumsq, h_ref.pow(2).sum(-1))
            chk.record(
                "linear+residual+norm_out",
                "skinny Triton, split-K, NORM_OUT (o_proj)",
                f"o[{rows},{inner}] W[{hid},{inner}]",
                outs,
                timed(lambda o=o, wo=wo, res=res, wn=wn: K.linear(o, wo, residual=res, next_norm_weight=wn), dev),
            )
            xr = F.rms_norm(h_ref, (hid,), eps=1e-5) * f32(wn)
            for name, n, gated in (("qkv", 96 if args.small else 6144, False),
                                   ("mlp gate+up", 128 if args.small else 14336, True)):  # fmt: skip
                w1 = (torch.randn(n, hid, device=dev) * hid**-0.5).to(bf)
                w2 = (torch.randn(n, hid, device=dev) * hid**-0.5).to(bf)
                ref = F.silu(xr @ f32(w1).T) * (xr @ f32(w2).T) if gated else xr @ f32(w1).T
                run = functools.partial(
                    K.gated_linear if gated else K.linear, normed, w1, *([w2] if gated else []),
                    norm_weight=wn, norm_eps=1e-5, backend="triton",
                )  # fmt: skip
                chk.record(
                    "linear+rms_norm",
                    f"skinny Triton, NORM ({name})",
                    f"x[{rows},{hid}] W[{n},{hid}]",
                    {"y": (run(), ref)},
                    timed(run, dev),
                )
    except Exception as exc:
        chk.error("linear+rms_norm", exc)
    # ------- KDA's two low-rank gate up-projections in one launch (linear_pair: GROUPED skinny kernel) -------
    try:
        r_, n_ = (16, 64) if args.small else (128, 4096)
        for rows in (1, 16):
            buf = torch.randn(rows, 3 * n_ + 2 * r_ + 32, device=dev).to(bf)  # as the packed input projection's output
            fa, ga = buf[:, 3 * n_ : 3 * n_ + r_], buf[:, 3 * n_ + r_ : 3 * n_ + 2 * r_]
            wp = (torch.randn(2 * n_, r_, device=dev) * r_**-0.5).to(bf)
            ref = torch.cat([f32(fa) @ f32(wp[:n_]).T, f32(ga) @ f32(wp[n_:]).T], dim=-1)
            chk.record(
                "linear_pair",
                "skinny Triton, GROUPED (KDA f_b | g_b)",
                f"x[{rows},{r_}] x2 W[{2 * n_},{r_}]",
                {"y": (K.linear_pair(fa, ga, wp, n_), ref)},
                timed(lambda fa=fa, ga=ga, wp=wp: K.linear_pair(fa, ga, wp, n_), dev),
            )
    except Exception as exc:
        chk.error("linear_pair", exc)

    ok = all(r["pass"] for r in chk.rows)
    chk.flush()
    print(f"\n{sum(r['pass'] for r in chk.rows)}/{len(chk.rows)} checks pass; JSON: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
