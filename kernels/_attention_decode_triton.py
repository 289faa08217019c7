"""Triton kernels behind ``attention_decode(..., backend="triton")`` (imported lazily: needs triton).

Split-K single-query GQA decode over a static cache (flash-decoding): program ``(b, kv head, split)`` reads its
share of the cache slots once for all ``G`` query heads of that KV head (padded to ``GP >= 16`` rows for
``tl.dot``) through a software-pipelined loop (``STAGES`` blocks of K and V in flight), keeps an online softmax in
fp32, and writes a partial ``(max, sum, acc)`` for the ``G`` real rows only (a split with no valid slot writes
``(-inf, 0, 0)``, which the merge weighs 0); a second kernel merges the splits of a
``(b, kv head)`` from whole tiles (``CH`` splits per load, ``GQ >= G`` rows), not one split after another. The
number of splits is chosen so that ``B * Hkv * splits`` fills the GPU at small batch, which is where one program per
(sequence, head) leaves most of the memory bandwidth unused, with splits long enough for the pipeline to matter.

Precision: ``q . k`` takes the inputs as they are with an fp32 accumulator (bf16 products are exact in fp32, so
this equals the fp32 reference up to summation order); ``p . v`` rounds the probabilities to the cache dtype
(bf16: ~2^-9 relative per weight, as flash attention kernels do). fp32 inputs, and every input in Triton's
interpreter (whose bf16 ``tl.dot`` returns garbage: Triton 3.9, checked 2026-11-28), use IEEE fp32 dots on tiles
upcast after loading; so the CPU tests check the masking, online softmax, splits and merge with bf16 caches, and the
bf16 tensor-core dots are checked on the GPU (``benchmarks/check_gpu_kernels.py``).
Masked slots (``valid`` false) get probability 0; a row with no valid slot is left to the caller (NaN, as the
reference gives). Where the valid slots are a prefix of each row (the decode caches: slot ``j`` is valid once token
``j`` is written, :class:`~placement_search.evaluators.cache.AttentionCache`), the split kernel takes the rows'
lengths instead of the mask (``PREFIX``): nothing past a row's length is read, and no K/V load waits for a mask
load.
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
    STAGES: tl.constexpr = 1,  # K/V blocks in flight in the slot loop
    PREFIX: tl.constexpr = False,  # valid_ptr is int32 [B] lengths: the valid slots are the first ones
):  # fmt: skip
    """The partial softmax of split ``program_id(2)`` of KV head ``program_id(1)``, row ``program_id(0)``.
    ``PREFIX``: the loop stops at the row's length (no slot past it is read) and its loads are masked by position
    only; otherwise each block's ``valid`` bytes are loaded first and mask the K/V loads (a load that depends on a
    load)."""
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
    if PREFIX:
        stop = tl.minimum(stop, tl.load(valid_ptr + b))
    for s0 in tl.range(start, stop, BLOCK_S, num_stages=STAGES):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < stop
        if PREFIX:  # noqa: SIM108 (a constexpr branch: the mask load is not compiled)
            ok = smask
        else:
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
    row = (b * HKV + h) * NSPLIT + sp  # partials [B * HKV * NSPLIT, G(, D)]: the real rows only
    tl.store(m_ptr + row * G + g, m, mask=gmask)
    tl.store(l_ptr + row * G + g, l_sum, mask=gmask)
    tl.store(acc_ptr + (row * G + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, so_b, so_h,
    HKV: tl.constexpr, NSPLIT: tl.constexpr, G: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
    CH: tl.constexpr,
    PDL: tl.constexpr = 0,
):  # fmt: skip
    """``out[b, h*G:(h+1)*G] = sum_sp w_sp acc_sp / sum_sp w_sp l_sp`` with ``w_sp = exp(m_sp - max m)`` for
    ``(b, h) = program_id``; partials read ``CH`` splits at a time as ``[CH, GQ(, D)]`` tiles."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, GQ)
    d = tl.arange(0, D)
    c = tl.arange(0, CH)
    gmask = g < G
    base = (b * HKV + h) * NSPLIT
    m_all = tl.full([GQ], float("-inf"), tl.float32)
    for c0 in tl.static_range(0, NSPLIT, CH):
        ok = ((c0 + c) < NSPLIT)[:, None] & gmask[None, :]
        mt = tl.load(m_ptr + (base + c0 + c)[:, None] * G + g[None, :], mask=ok, other=float("-inf"))
        m_all = tl.maximum(m_all, tl.max(mt, axis=0))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros([GQ], tl.float32)
    acc = tl.zeros([GQ, D], tl.float32)
    for c0 in tl.static_range(0, NSPLIT, CH):
        ok = ((c0 + c) < NSPLIT)[:, None] & gmask[None, :]
        rows = (base + c0 + c)[:, None] * G + g[None, :]  # [CH, GQ]
        w = tl.exp(tl.load(m_ptr + rows, mask=ok, other=float("-inf")) - m_safe[None, :])
        l_all += tl.sum(w * tl.load(l_ptr + rows, mask=ok, other=0.0), axis=0)
        at = tl.load(acc_ptr + rows[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0)
        acc += tl.sum(w[:, :, None] * at, axis=0)
    out = acc / l_all[:, None]
    tl.store(out_ptr + b * so_b + (h * G + g)[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None])  # fmt: skip
