"""Triton kernels behind :mod:`.linear` and :func:`.norm.rms_norm`'s Triton path (imported lazily: needs triton).

Decode is memory-bound: a step of a few sequences reads every weight once and does almost no arithmetic, so
the matrix products are matrix-vector products whose speed is the weight-read rate. ``skinny_linear_kernel``
streams the weight ``[N, K]`` (rows contiguous along K) through a software-pipelined loop; each program owns
``BN`` output columns for all ``M <= BM`` rows of the activation and the whole K. ``tl.dot`` on a ``BM = 16``
tile keeps the fp32 accumulation on the tensor cores (rows past ``M`` are masked to zero). Two epilogues save
a launch and a round trip of the activation each:

- ``GATED``: a second weight of the same shape; the output is ``silu(x W^T) * (x W2^T)`` (the gated MLP's
  gate and up projections in one pass over both weights).
- ``HAS_BIAS``: ``x W^T + b`` (not with ``GATED``).
- ``RESIDUAL``: the output is ``r + x W^T`` (the block's residual add after the mixer's or MLP's output
  projection).

Rounding follows the torch composition: each projection is rounded to the activation dtype, then SiLU, the
product and the residual add are each rounded again (``_rnd``), so results differ from cuBLAS only by the
fp32 summation order.

``rms_norm_kernel``: one program per row; fp32 statistics, the normalised row rounded to the input dtype,
then multiplied by the weight (rounded again), as :func:`.norm.rms_norm` does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._fused_decode_triton import _rnd


@triton.jit
def skinny_linear_kernel(
    x_ptr, s_xm,  # [M, K] activation, row stride (unit column stride)
    w_ptr, s_wn,  # [N, K] weight, row stride (unit column stride)
    w2_ptr, s_w2n,  # [N, K] second weight (GATED only)
    b_ptr,  # [N] bias (HAS_BIAS only; added before the rounding, as cuBLAS's epilogue does)
    r_ptr, s_rm,  # [M, N] residual (RESIDUAL only)
    o_ptr, s_om,  # [M, N] output
    M, N, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    GATED: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,  # True only in the interpreter, whose tl.dot mishandles bf16 operands
):  # fmt: skip
    """``o[:, n0:n0+BN] = epilogue(x @ W[n0:n0+BN].T)`` for ``n0 = program_id(0) * BN``."""
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rm = tl.arange(0, BM)
    rn = pid * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mm = rm < M
    nm = rn < N
    x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * s_wn + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if GATED:
        w2_ptrs = w2_ptr + rn.to(tl.int64)[:, None] * s_w2n + rk[None, :]
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mm[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=nm[:, None], other=0.0)
        else:
            km = (k0 + rk) < K
            x = tl.load(x_ptrs, mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=nm[:, None] & km[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            if EVEN_K:
                w2 = tl.load(w2_ptrs, mask=nm[:, None], other=0.0)
            else:
                w2 = tl.load(w2_ptrs, mask=nm[:, None] & km[None, :], other=0.0)
            if UPCAST:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(x, tl.trans(w2), acc2)
            w2_ptrs += BK
        x_ptrs += BK
        w_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    y = _rnd(acc, DTYPE)
    if GATED:
        y = _rnd(y * tl.sigmoid(y), DTYPE)
        y = _rnd(y * _rnd(acc2, DTYPE), DTYPE)
    omask = mm[:, None] & nm[None, :]
    if RESIDUAL:
        r = tl.load(r_ptr + rm[:, None] * s_rm + rn[None, :], mask=omask, other=0.0).to(tl.float32)
        y = _rnd(r + y, DTYPE)
    tl.store(o_ptr + rm[:, None] * s_om + rn[None, :], y.to(DTYPE), mask=omask)


@triton.jit
def rms_norm_kernel(
    x_ptr, s_x,  # [M, D]
    w_ptr,  # [D]
    o_ptr, s_o,  # [M, D]
    D, eps,
    BD: tl.constexpr,
):  # fmt: skip
    """``o[m] = round(x[m] * rsqrt(mean(x[m]^2) + eps)) * w`` for ``m = program_id(0)`` (fp32 statistics)."""
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BD)
    m = r < D
    x = tl.load(x_ptr + row * s_x + r, mask=m, other=0.0).to(tl.float32)
    y = _rnd(x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps), DTYPE)
    w = tl.load(w_ptr + r, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * s_o + r, _rnd(y * w, DTYPE).to(DTYPE), mask=m)
