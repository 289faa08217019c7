"""Triton kernels behind ``attention_decode(..., backend="triton")`` (imported lazily: needs triton).

Split-K single-query GQA decode over a static cache (flash-decoding): program ``(b, kv head, split)`` reads its
share of the cache slots once for all ``G`` query heads of that KV head (padded to ``GP >= 16`` rows for
``tl.dot``), keeps an online softmax in fp32, and writes a partial ``(max, sum, acc)``; a second kernel merges the
splits. The number of splits is chosen so that ``B * Hkv * splits`` fills the GPU at small batch, which is where
one program per (sequence, head) leaves most of the memory bandwidth unused.

Precision: ``q . k`` takes the inputs as they are with an fp32 accumulator (bf16 products are exact in fp32, so
this equals the fp32 reference up to summation order); ``p . v`` rounds the probabilities to the cache dtype
(bf16: ~2^-9 relative per weight, as flash attention kernels do). fp32 inputs, and every input in Triton's
interpreter (whose bf16 ``tl.dot`` returns garbage: Triton 3.9, checked 2026-11-28), use IEEE fp32 dots on tiles
upcast after loading; so the CPU tests check the masking, online softmax, splits and merge with bf16 caches, and the
bf16 tensor-core dots are checked on the GPU (``benchmarks/check_gpu_kernels.py``).
Masked slots (``valid`` false) get probability 0; a row with no valid slot is left to the caller (NaN, as the
reference gives).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._pdl_triton import pdl_enter


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr,
    S, split_len,
    sq_b, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sval_b,
    scale,
    HKV: tl.constexpr, NSPLIT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_S: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch mode (backend.pdl_launch, _pdl_triton.pdl_enter)
):  # fmt: skip
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    start = sp * split_len
    stop = tl.minimum(start + split_len, S)
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < stop
        ok = tl.load(valid_ptr + b * sval_b + s, mask=smask, other=0) != 0
        k = tl.load(k_ptr + b * sk_b + s[:, None] * sk_s + h * sk_h + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + b * sv_b + s[:, None] * sv_s + h * sv_h + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:  # a constexpr branch: only one of the two dots is compiled
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(ok[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid slot yet: keep exp() finite
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    row = (b * HKV + h) * NSPLIT + sp
    tl.store(m_ptr + row * GP + g, m)
    tl.store(l_ptr + row * GP + g, l_sum)
    tl.store(acc_ptr + (row * GP + g)[:, None] * D + d[None, :], acc)


@triton.jit
def _decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, so_b, so_h,
    HKV: tl.constexpr, NSPLIT: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    base = (b * HKV + h) * NSPLIT
    m_all = tl.full([GP], float("-inf"), tl.float32)
    for sp in range(NSPLIT):
        m_all = tl.maximum(m_all, tl.load(m_ptr + (base + sp) * GP + g))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for sp in range(NSPLIT):
        w = tl.exp(tl.load(m_ptr + (base + sp) * GP + g) - m_safe)
        l_all += w * tl.load(l_ptr + (base + sp) * GP + g)
        acc += w[:, None] * tl.load(acc_ptr + ((base + sp) * GP + g)[:, None] * D + d[None, :])
    out = acc / l_all[:, None]
    gmask = g < G
    tl.store(out_ptr + b * so_b + (h * G + g)[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None])  # fmt: skip
