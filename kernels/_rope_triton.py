"""Triton kernel behind :func:`.rope.rope_cache_write` (imported lazily: needs triton).

One decode step of an attention layer between its input projection and the attention itself: RoPE on the query
heads and key heads, and the rotated keys and the values written into the cache slot of each row, in one launch
(the torch composition takes two rolls, the fp32 products and sums, two casts and two indexed copies).

Rounding: like :func:`.rope.apply_rope_tables`, ``x * cos + rolled(x) * sin_signed`` in fp32, rounded once to the
activation dtype (the compiler may contract it into a fused multiply-add: at most one unit in the last place of
the rounded result apart).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._pdl_triton import pdl_enter, pdl_release


@triton.jit
def rope_cache_write_kernel(
    q_ptr, s_qb, s_qh,  # [B, H, D] queries (unit stride over D)
    k_ptr, s_kb, s_kh,  # [B, HKV, D] keys
    v_ptr, s_vb, s_vh,  # [B, HKV, D] values
    cos_ptr, sin_ptr, s_tab,  # [B, D] fp32 tables (sin with the first half negated)
    slot_ptr,  # [B] cache slot of each row's token
    qo_ptr, s_qob, s_qoh,  # [B, H, D] rotated queries (output)
    kc_ptr, vc_ptr, s_cb, s_cs, s_ch,  # caches [B, S, HKV, D] (same strides), written at [b, slot]
    H,
    D: tl.constexpr, BD: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch mode (backend.pdl_launch, _pdl_triton.pdl_enter)
):  # fmt: skip
    """Row ``program_id(0)``; head ``program_id(1)``: query heads ``0..H-1``, then key/value heads."""
    pdl_enter(PDL)
    i_b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BD)
    dm = d < D
    dr = (d + D // 2) % D
    cos = tl.load(cos_ptr + i_b * s_tab + d, mask=dm, other=0.0)
    sin = tl.load(sin_ptr + i_b * s_tab + d, mask=dm, other=0.0)
    pdl_release(PDL)
    if h < H:
        base = q_ptr + i_b * s_qb + h * s_qh
        x = tl.load(base + d, mask=dm, other=0.0).to(tl.float32)
        xr = tl.load(base + dr, mask=dm, other=0.0).to(tl.float32)
        y = x * cos + xr * sin
        tl.store(qo_ptr + i_b * s_qob + h * s_qoh + d, y.to(qo_ptr.dtype.element_ty), mask=dm)
    else:
        kh = h - H
        base = k_ptr + i_b * s_kb + kh * s_kh
        x = tl.load(base + d, mask=dm, other=0.0).to(tl.float32)
        xr = tl.load(base + dr, mask=dm, other=0.0).to(tl.float32)
        y = x * cos + xr * sin
        slot = tl.load(slot_ptr + i_b).to(tl.int64)
        dst = i_b * s_cb + slot * s_cs + kh * s_ch + d
        tl.store(kc_ptr + dst, y.to(kc_ptr.dtype.element_ty), mask=dm)
        v = tl.load(v_ptr + i_b * s_vb + kh * s_vh + d, mask=dm, other=0.0)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=dm)
