"""Triton kernel behind :func:`.conv.causal_conv1d` with ``backend="triton"`` (imported lazily: needs triton).

A module of its own for the reason :mod:`._fused_decode_triton` gives (``triton.jit`` picks compiled or interpreted
at decoration time).

One program computes a ``[BT, BC]`` tile of ``y[b, t, c] = silu(sum_i w[c, i] * xpad[b, t + i, c])`` straight from
the ``[B, T, C]`` input (any row stride: GDN's conv input is a slice of a wider projection) and the optional
``[B, C, K-1]`` initial state, and stores it in the input dtype. The torch path (transpose + fp32 copy, ``cat``
with the state, depthwise ``conv1d``, SiLU, transpose back + cast: six kernels and three fp32 round trips through
memory) does the same arithmetic, and the kernel keeps its order so that compiled results are bitwise equal on
CUDA: the fp32 sum starts at 0 and adds ``w[c, i] * x`` for i = 0..K-1 in order (one fused multiply-add each, as
nvcc compiles torch's depthwise kernel), SiLU is ``y / (1 + exp(-y))`` with a correctly rounded division and
libdevice's ``exp`` (torch's SiLU kernel), and the result is rounded to nearest even once.
``benchmarks/check_gpu_kernels.py`` checks the equality on the GPU; the CPU tests run the kernel in Triton's
interpreter, whose numpy math is close but not bitwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._fused_decode_triton import _rnd

#: The kernel's ``DTYPE`` for each input dtype it takes.
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def causal_conv1d_fwd_kernel(
    x_ptr, s_xb, s_xt,  # [B, T, C] input, unit channel stride
    st_ptr, s_sb, s_sc, s_sk,  # [B, C, K-1] initial state (read only when HAS_STATE)
    w_ptr, s_wc, s_wk,  # [C, K] weight
    y_ptr, s_yb, s_yt,  # [B, T, C] output, unit channel stride
    T, C,
    KW: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_STATE: tl.constexpr,
    SILU: tl.constexpr,
    DTYPE: tl.constexpr,
    LIBDEVICE: tl.constexpr,  # False only in the interpreter, whose libdevice functions are stubs
):  # fmt: skip
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    tm = t < T
    cm = c < C
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for i in tl.static_range(KW):
        # xpad[t + i] = x[t + i - (K-1)] for t + i >= K-1, else the initial state's column t + i (or zero)
        src = t + (i - (KW - 1))
        in_x = src >= 0
        xv = tl.load(
            x_ptr + i_b * s_xb + src[:, None] * s_xt + c[None, :],
            mask=(tm & in_x)[:, None] & cm[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_STATE:
            sv = tl.load(
                st_ptr + i_b * s_sb + c[None, :] * s_sc + (src + (KW - 1))[:, None] * s_sk,
                mask=(tm & (src < 0))[:, None] & cm[None, :],
                other=0.0,
            ).to(tl.float32)
            xv = tl.where(in_x[:, None], xv, sv)
        wv = tl.load(w_ptr + c * s_wc + i * s_wk, mask=cm, other=0.0).to(tl.float32)
        acc += wv[None, :] * xv
    if SILU:
        if LIBDEVICE:  # noqa: SIM108 (a constexpr branch: only the chosen call is compiled)
            e = libdevice.exp(-acc)
        else:
            e = tl.exp(-acc)
        acc = tl.math.div_rn(acc, 1.0 + e)
    tl.store(
        y_ptr + i_b * s_yb + t[:, None] * s_yt + c[None, :],
        _rnd(acc, DTYPE).to(y_ptr.dtype.element_ty),
        mask=tm[:, None] & cm[None, :],
    )
