"""Triton kernels behind :mod:`.fused_decode` (imported lazily: needs triton).

Kept in a module of its own because ``triton.jit`` decides at decoration time whether a kernel runs compiled or
in Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them): importing this module only when a
Triton backend is asked for keeps that choice with the caller and keeps triton out of the CPU runtime's imports.

Both kernels fuse a whole decode step after the input projections. Each program owns whole heads: every channel
it reads from a conv state is written back by the same program (after a CTA barrier), so the in-place shift has no
race between programs. The fp32 state tile ``[DK, DV]`` of one head lives in registers.

Rounding: wherever the torch composition (:func:`.fused_decode.gdn_decode_step` with ``backend="torch"``) rounds
an intermediate to the activation dtype (conv output, beta, o, the normalised o, the gate), the kernel rounds it
too (``_rnd``), so bf16 results match the reference up to fp32 reassociation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rnd(x, DTYPE: tl.constexpr):  # (triton jit helper)
    """Round fp32 ``x`` to the activation dtype, to nearest even, and back to fp32 (no-op for fp32).

    bf16 is rounded by hand on the bits: Triton's interpreter truncates on ``.to(tl.bfloat16)`` (and ignores
    ``fp_downcast_rounding``), while torch and compiled Triton round to nearest even. The result is exactly
    representable in bf16, so a later store converts it exactly either way.
    """
    if DTYPE == tl.bfloat16:  # noqa: SIM300
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:  # noqa: SIM300
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _conv_silu_update(
    x_ptr,  # [C] row of the new inputs
    cs_ptr,  # conv state row base [C, KW-1]
    w_ptr,  # weight [C, KW]
    c0,  # first channel
    n_ch,  # channels (<= BC)
    s_cs_c,
    s_cs_k,
    s_w_c,
    s_w_k,
    BC: tl.constexpr,
    KW: tl.constexpr,
    KWP: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Causal conv of one channel block at one step + SiLU; shifts the block's conv state in place.

    Returns ``silu(sum_j w[c, j] * window[c, j])`` in fp32 (rounded to DTYPE), ``window = [state[c, :], x[c]]``.
    """
    c = tl.arange(0, BC)
    j = tl.arange(0, KWP)
    cm = c < n_ch
    ch = c0 + c
    x = tl.load(x_ptr + ch, mask=cm, other=0.0).to(tl.float32)
    old = tl.load(
        cs_ptr + ch[:, None] * s_cs_c + j[None, :] * s_cs_k,
        mask=cm[:, None] & (j[None, :] < KW - 1),
        other=0.0,
    ).to(tl.float32)
    win = tl.where(j[None, :] == KW - 1, x[:, None], old)  # [BC, KWP]
    w = tl.load(
        w_ptr + ch[:, None] * s_w_c + j[None, :] * s_w_k,
        mask=cm[:, None] & (j[None, :] < KW),
        other=0.0,
    ).to(tl.float32)
    y = tl.sum(win * w, axis=1)
    y = _rnd(y * tl.sigmoid(y), DTYPE)
    # every thread of the program has its window before anyone overwrites the state
    tl.debug_barrier()
    tl.store(
        cs_ptr + ch[:, None] * s_cs_c + (j[None, :] - 1) * s_cs_k,
        win.to(cs_ptr.dtype.element_ty),
        mask=cm[:, None] & (j[None, :] >= 1) & (j[None, :] < KW),
    )
    return y


@triton.jit
def _l2norm_scale(x, scale, EPS: tl.constexpr):
    """``x * rsqrt(sum(x^2) + EPS) * scale`` in fp32."""
    return x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) + EPS)) * scale


@triton.jit
def _delta_rule_head(
    s_ptrs,  # [BK, BV] pointers into the fp32 state
    s_mask,
    q,  # [BK] l2-normalised, scaled
    k,  # [BK] l2-normalised
    v,  # [BV]
    decay,  # scalar or [BK, 1]
    beta,
):
    """One delta-rule step of one head, state updated in place; returns ``o = S^T q`` [BV] fp32."""
    S = tl.load(s_ptrs, mask=s_mask, other=0.0) * decay
    kv = tl.sum(S * k[:, None], axis=0)
    delta = beta * (v - kv)
    S = S + k[:, None] * delta[None, :]
    tl.store(s_ptrs, S, mask=s_mask)
    return tl.sum(S * q[:, None], axis=0)


@triton.jit
def _gated_rmsnorm(o, gate, w, n: tl.constexpr, eps: tl.constexpr, DTYPE: tl.constexpr):
    """``rmsnorm(o) * w * silu(gate)`` with the reference's roundings; o/gate/w fp32 [BV], zero past ``n``."""
    o = _rnd(o, DTYPE)
    y = _rnd(o * (1.0 / tl.sqrt(tl.sum(o * o, axis=0) / n + eps)), DTYPE)
    y = _rnd(y * w, DTYPE)
    sg = _rnd(gate * tl.sigmoid(gate), DTYPE)
    return _rnd(y * sg, DTYPE)


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def gdn_decode_kernel(
    qkv_ptr, s_qkv,  # [B, C] conv input (pre-conv q|k|v), row stride
    z_ptr, s_z,  # [B, HV*DV]
    b_ptr, s_b,  # [B, HV] (pre-sigmoid)
    a_ptr, s_a,  # [B, HV]
    cs_ptr, s_cs_b, s_cs_c, s_cs_k,  # conv state [B, C, KW-1], in place
    w_ptr, s_w_c, s_w_k,  # conv weight [C, KW]
    alog_ptr, dtb_ptr, nw_ptr,  # A_log [HV], dt_bias [HV], norm weight [DV]
    state_ptr,  # fp32 [B, HV, DK, DV] contiguous, in place
    out_ptr, s_out,  # [B, HV*DV]
    scale,
    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr,
    NORM_EPS: tl.constexpr, L2_EPS: tl.constexpr,
):  # fmt: skip
    """One GDN decode step for batch row ``program_id(0)`` and key head ``program_id(1)`` with its
    ``HV // HK`` value heads (they share the key head's q/k conv channels, so one program owns them)."""
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    i_b = tl.program_id(0).to(tl.int64)
    i_hk = tl.program_id(1)
    G: tl.constexpr = HV // HK
    row = qkv_ptr + i_b * s_qkv
    cs = cs_ptr + i_b * s_cs_b
    q = _conv_silu_update(row, cs, w_ptr, i_hk * DK, DK, s_cs_c, s_cs_k, s_w_c, s_w_k, BK, KW, KWP, DTYPE)
    k = _conv_silu_update(
        row, cs, w_ptr, HK * DK + i_hk * DK, DK, s_cs_c, s_cs_k, s_w_c, s_w_k, BK, KW, KWP, DTYPE
    )
    q = _l2norm_scale(q, scale, L2_EPS)
    k = _l2norm_scale(k, 1.0, L2_EPS)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    vm = rv < DV
    s_mask = (rk[:, None] < DK) & vm[None, :]
    nw = tl.load(nw_ptr + rv, mask=vm, other=0.0).to(tl.float32)
    for i in tl.static_range(G):
        hv = i_hk * G + i
        v = _conv_silu_update(
            row, cs, w_ptr, 2 * HK * DK + hv * DV, DV, s_cs_c, s_cs_k, s_w_c, s_w_k, BV, KW, KWP, DTYPE
        )
        b_raw = tl.load(b_ptr + i_b * s_b + hv).to(tl.float32)
        beta = _rnd(tl.sigmoid(b_raw), DTYPE)
        a = tl.load(a_ptr + i_b * s_a + hv).to(tl.float32) + tl.load(dtb_ptr + hv).to(tl.float32)
        g = -tl.exp(tl.load(alog_ptr + hv).to(tl.float32)) * _softplus(a)
        s_ptrs = state_ptr + ((i_b * HV + hv) * DK + rk[:, None]) * DV + rv[None, :]
        o = _delta_rule_head(s_ptrs, s_mask, q, k, v, tl.exp(g), beta)
        zg = tl.load(z_ptr + i_b * s_z + hv * DV + rv, mask=vm, other=0.0).to(tl.float32)
        y = _gated_rmsnorm(o, zg, nw, DV, NORM_EPS, DTYPE)
        tl.store(out_ptr + i_b * s_out + hv * DV + rv, y.to(out_ptr.dtype.element_ty), mask=vm)


@triton.jit
def kda_decode_kernel(
    q_ptr, s_q, k_ptr, s_k, v_ptr, s_v,  # [B, H*D] conv inputs, row strides
    f_ptr, s_f,  # [B, H*D] f_b_proj output (pre-gate)
    beta_ptr, s_beta,  # [B, H] beta_proj output (pre-sigmoid)
    gate_ptr, s_gate,  # [B, H*D] g_b_proj output
    qcs_ptr, kcs_ptr, vcs_ptr, s_cs_b, s_cs_c, s_cs_k,  # conv states [B, H*D, KW-1] (same strides)
    qw_ptr, kw_ptr, vw_ptr, s_w_c, s_w_k,  # conv weights [H*D, KW] (same strides)
    alog_ptr, dtb_ptr, nw_ptr,  # A_log [H], dt_bias [H*D], norm weight [D]
    state_ptr,  # fp32 [B, H, D, D] contiguous, in place
    out_ptr, s_out,  # [B, H*D]
    scale,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr,
    NORM_EPS: tl.constexpr, L2_EPS: tl.constexpr,
):  # fmt: skip
    """One KDA decode step for batch row ``program_id(0)`` and head ``program_id(1)``."""
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    c0 = i_h * D
    off_cs = i_b * s_cs_b
    q = _conv_silu_update(q_ptr + i_b * s_q, qcs_ptr + off_cs, qw_ptr, c0, D, s_cs_c, s_cs_k, s_w_c, s_w_k,
                          BD, KW, KWP, DTYPE)  # fmt: skip
    k = _conv_silu_update(k_ptr + i_b * s_k, kcs_ptr + off_cs, kw_ptr, c0, D, s_cs_c, s_cs_k, s_w_c, s_w_k,
                          BD, KW, KWP, DTYPE)  # fmt: skip
    v = _conv_silu_update(v_ptr + i_b * s_v, vcs_ptr + off_cs, vw_ptr, c0, D, s_cs_c, s_cs_k, s_w_c, s_w_k,
                          BD, KW, KWP, DTYPE)  # fmt: skip
    q = _l2norm_scale(q, scale, L2_EPS)
    k = _l2norm_scale(k, 1.0, L2_EPS)
    r = tl.arange(0, BD)
    m = r < D
    f = tl.load(f_ptr + i_b * s_f + c0 + r, mask=m, other=0.0).to(tl.float32)
    f = f + tl.load(dtb_ptr + c0 + r, mask=m, other=0.0).to(tl.float32)
    g = -tl.exp(tl.load(alog_ptr + i_h).to(tl.float32)) * _softplus(f)  # [BD] per key channel
    beta = _rnd(tl.sigmoid(tl.load(beta_ptr + i_b * s_beta + i_h).to(tl.float32)), DTYPE)
    s_ptrs = state_ptr + ((i_b * H + i_h) * D + r[:, None]) * D + r[None, :]
    s_mask = m[:, None] & m[None, :]
    o = _delta_rule_head(s_ptrs, s_mask, q, k, v, tl.exp(g)[:, None], beta)
    nw = tl.load(nw_ptr + r, mask=m, other=0.0).to(tl.float32)
    gt = tl.load(gate_ptr + i_b * s_gate + c0 + r, mask=m, other=0.0).to(tl.float32)
    y = _gated_rmsnorm(o, gt, nw, D, NORM_EPS, DTYPE)
    tl.store(out_ptr + i_b * s_out + c0 + r, y.to(out_ptr.dtype.element_ty), mask=m)
