"""Triton kernels behind :mod:`.fused_decode` (imported lazily: needs triton).

Kept in a module of its own because ``triton.jit`` decides at decoration time whether a kernel runs compiled or
in Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them): importing this module only when a
Triton backend is asked for keeps that choice with the caller and keeps triton out of the CPU runtime's imports.

Each mixer's decode step after the input projections is two launches (three from ``PRECONV_MIN_ROWS`` rows: see
:func:`conv_update_kernel`). The *state* kernel has one program per
batch row, head and block of ``BV`` value columns: it computes the conv outputs it needs (q and k of its head: the
whole key dimension; its block of v), the gates, the delta-rule update of its ``[DK, BV]`` fp32 state tile (held in
registers) and ``o = S^T q`` for its columns. The *finish* kernel (one program per row and head) applies the gated
RMSNorm, which needs the whole head's ``o``, and shifts the q/k conv channels. Every conv channel is shifted by the
one program that owns it, after every reader has read it: v blocks by their state program (no other program reads
them), q/k channels (read by all column blocks and, in GDN, by the value heads sharing a key head) by the finish
kernel, which runs after the state kernel. Splitting the value columns keeps the tiles small (more programs in
flight per SM, and B * H * DV / BV programs in all: 128 at batch 1). The grid is ``[B, H, DV / BV]`` or, with
``VFIRST``, ``[DV / BV, H, B]``: launch order in the state's memory order (:func:`_tile_of_program`).

Rounding: wherever the torch composition (:func:`.fused_decode.gdn_decode_step` with ``backend="torch"``) rounds
an intermediate to the activation dtype (conv output, beta, o, the normalised o, the gate), the kernel rounds it
too (``_rnd``), so bf16 results match the reference up to fp32 reassociation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._pdl_triton import pdl_enter, pdl_release, prefetch_l2


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
    WRITE: tl.constexpr = True,
):
    """Causal conv of one channel block at one step + SiLU; shifts the block's conv state in place (``WRITE``).

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
    if WRITE:
        # every thread of the program has its window before anyone overwrites the state
        tl.debug_barrier()
        tl.store(
            cs_ptr + ch[:, None] * s_cs_c + (j[None, :] - 1) * s_cs_k,
            win.to(cs_ptr.dtype.element_ty),
            mask=cm[:, None] & (j[None, :] >= 1) & (j[None, :] < KW),
        )
    return y


@triton.jit
def _conv_shift(
    x_ptr,  # [C] row of the new inputs
    cs_ptr,  # conv state row base [C, KW-1]
    c0,  # first channel
    n_ch,  # channels (<= BC)
    s_cs_c,
    s_cs_k,
    BC: tl.constexpr,
    KW: tl.constexpr,
    KWP: tl.constexpr,
):
    """``state[c] = [state[c, 1:], x[c]]`` for channels ``c0 .. c0 + n_ch`` (in place; the program's own channels)."""
    c = c0 + tl.arange(0, BC)
    j = tl.arange(0, KWP)
    cm = tl.arange(0, BC) < n_ch
    x = tl.load(x_ptr + c, mask=cm, other=0.0)
    old = tl.load(cs_ptr + c[:, None] * s_cs_c + j[None, :] * s_cs_k, mask=cm[:, None] & (j[None, :] < KW - 1), other=0.0)
    win = tl.where(j[None, :] == KW - 1, x[:, None].to(old.dtype), old)
    tl.debug_barrier()
    tl.store(cs_ptr + c[:, None] * s_cs_c + (j[None, :] - 1) * s_cs_k, win, mask=cm[:, None] & (j[None, :] >= 1) & (j[None, :] < KW))


@triton.jit
def conv_update_kernel(
    x0_ptr, x1_ptr, x2_ptr, s_x,  # up to three [B, C] new inputs (the same row stride)
    cs0_ptr, cs1_ptr, cs2_ptr, s_cs_b, s_cs_c, s_cs_k,  # their conv states [B, C, KW-1] (same strides), in place
    w0_ptr, w1_ptr, w2_ptr, s_w_c, s_w_k,  # their weights [C, KW] (same strides)
    y_ptr, s_yt, s_y,  # [T, B, C] outputs: silu(conv) rounded to their dtype, tensor t at y_ptr + t * s_yt
    B, C,
    BR: tl.constexpr, BC: tl.constexpr, KW: tl.constexpr,
    PDL: tl.constexpr = 0,
):  # fmt: skip
    """One conv step of rows ``program_id(0) * BR ..``, channels ``program_id(1) * BC ..`` of input
    ``program_id(2)``: ``y = silu(sum_j w[c, j] * window[c, j])`` with ``window = [state[c, :], x[c]]`` (the fp32
    sum in tap order), stored; the state shifted. The state kernels' ``PRECONV`` input (KDA's q, k and v in one
    launch). Each tap is a ``[BR, BC]`` load of its own, so that no lane holds a padded window."""
    pdl_enter(PDL)
    t = tl.program_id(2)
    x_ptr, cs_ptr, w_ptr = x0_ptr, cs0_ptr, w0_ptr
    if t == 1:
        x_ptr, cs_ptr, w_ptr = x1_ptr, cs1_ptr, w1_ptr
    if t == 2:
        x_ptr, cs_ptr, w_ptr = x2_ptr, cs2_ptr, w2_ptr
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r < B)[:, None] & (c < C)[None, :]
    r64 = r.to(tl.int64)[:, None]
    st = cs_ptr + r64 * s_cs_b + c[None, :] * s_cs_c
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for j in tl.static_range(KW):
        if j < KW - 1:
            xj = tl.load(st + j * s_cs_k, mask=m, other=0.0)
        else:
            xj = tl.load(x_ptr + r64 * s_x + c[None, :], mask=m, other=0.0).to(cs_ptr.dtype.element_ty)
        if j >= 1:  # the window moves left by one: tap j goes where tap j - 1 was
            tl.store(st + (j - 1) * s_cs_k, xj, mask=m)
        wj = tl.load(w_ptr + c * s_w_c + j * s_w_k, mask=c < C, other=0.0).to(tl.float32)
        acc += wj[None, :] * xj.to(tl.float32)
    pdl_release(PDL)
    y = _rnd(acc * tl.sigmoid(acc), y_ptr.dtype.element_ty)
    tl.store(y_ptr + t * s_yt + r64 * s_y + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _load_channels(row_ptr, c0, n, BC: tl.constexpr):
    """Channels ``c0 .. c0 + n`` of a row as fp32 ``[BC]`` (zero past ``n``)."""
    c = tl.arange(0, BC)
    return tl.load(row_ptr + c0 + c, mask=c < n, other=0.0).to(tl.float32)


@triton.jit
def _l2norm_scale(x, scale, EPS: tl.constexpr):
    """``x * rsqrt(sum(x^2) + EPS) * scale`` in fp32."""
    return x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) + EPS)) * scale


@triton.jit
def _load_state(s_ptrs, s_mask, STREAM: tl.constexpr = False):
    """The ``[BK, BV]`` fp32 state tile (with ``STREAM``: the evict-first hint)."""
    if STREAM:
        return tl.load(s_ptrs, mask=s_mask, other=0.0, eviction_policy="evict_first")
    return tl.load(s_ptrs, mask=s_mask, other=0.0)


@triton.jit
def _delta_rule_head(
    s_ptrs,  # [BK, BV] pointers into the fp32 state
    s_mask,
    S,  # the tile loaded from them (_load_state)
    q,  # [BK] l2-normalised, scaled
    k,  # [BK] l2-normalised
    v,  # [BV]
    decay,  # scalar or [BK, 1]
    beta,
    STREAM: tl.constexpr = False,  # the state written with the streaming cache hint (.cs)
):
    """One delta-rule step of one head, state updated in place; returns ``o = S^T q`` [BV] fp32."""
    S = S * decay
    kv = tl.sum(S * k[:, None], axis=0)
    delta = beta * (v - kv)
    S = S + k[:, None] * delta[None, :]
    if STREAM:
        tl.store(s_ptrs, S, mask=s_mask, cache_modifier=".cs")
    else:
        tl.store(s_ptrs, S, mask=s_mask)
    return tl.sum(S * q[:, None], axis=0)


@triton.jit
def _state_tile_ptrs(state_ptr, head, rk, v0, rv, DK: tl.constexpr, DV: tl.constexpr, WIDE: tl.constexpr = False):
    """Pointers ``[BK, BV]`` to rows ``rk`` and columns ``v0 + rv`` of state matrix ``head`` (int64: ``row * H +
    head``) of the fp32 ``[B, H, DK, DV]`` state: the matrix's base as one 64-bit scalar, then 32-bit offsets within
    it. ``WIDE`` forms every element's address in 64 bits from the row index instead, as before session 17: the
    compiler then keeps the ``[BK, BV]`` 64-bit addresses live across the update, 158 registers a thread for GDN's
    128 x 64 tile (three programs an SM) against 121 (four) with the base (``benchmarks/kernel_resources.py``)."""
    if WIDE:
        return state_ptr + (head * DK + rk[:, None]) * DV + v0 + rv[None, :]
    base = state_ptr + head * (DK * DV) + v0
    return base + rk[:, None] * DV + rv[None, :]


@triton.jit
def _tile_of_program(VFIRST: tl.constexpr):
    """``(batch row, head, value block)`` of this state program: grid ``[B, H, NV]`` (axis 0 fastest: one wave
    holds the first value block of every row's first heads) or, with ``VFIRST``, ``[NV, H, B]`` (launch order is
    the state's memory order ``[B, H, DK, DV]``: a wave reads one contiguous stretch)."""
    if VFIRST:
        return tl.program_id(2), tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1), tl.program_id(2)


@triton.jit
def _prefetch_tile_ahead(state_ptr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         AHEAD: tl.constexpr, VFIRST: tl.constexpr = False):  # fmt: skip
    """Ask L2 for the ``[DK, BV]`` state tile of the program ``AHEAD`` places after this one in launch order (grid
    of :func:`_tile_of_program`, axis 0 fastest; state ``[B, H, DK, DV]`` fp32): with ``AHEAD`` the programs the GPU
    holds at once, a program of one wave fetches a tile of the next, whose loads then hit L2 (:func:`.prefetch_l2`)."""
    n0 = tl.num_programs(0)
    n1 = tl.num_programs(1)
    nxt = tl.program_id(0) + n0 * (tl.program_id(1) + n1 * tl.program_id(2)) + AHEAD
    if nxt < n0 * n1 * tl.num_programs(2):
        nh = n1
        if VFIRST:
            nb = tl.num_programs(2)
            v0 = (nxt % n0) * BV
            h = (nxt // n0) % nh
            b = nxt // (n0 * nh)
        else:
            nb = n0
            b = nxt % nb
            h = (nxt // nb) % nh
            v0 = (nxt // (nb * nh)) * BV
        LPR: tl.constexpr = (BV + 31) // 32  # 128-byte lines (32 fp32) per tile row
        rk = tl.minimum(tl.arange(0, BK), DK - 1)
        cols = tl.minimum(v0 + tl.arange(0, LPR) * 32, DV - 1)
        prefetch_l2(state_ptr + ((b * nh + h) * DK + rk[:, None]).to(tl.int64) * DV + cols[None, :])


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
def gdn_state_kernel(
    qkv_ptr, s_qkv,  # [B, C] conv input (pre-conv q|k|v), row stride
    b_ptr, s_b,  # [B, HV] (pre-sigmoid)
    a_ptr, s_a,  # [B, HV]
    cs_ptr, s_cs_b, s_cs_c, s_cs_k,  # conv state [B, C, KW-1]: the v channels shifted in place here
    w_ptr, s_w_c, s_w_k,  # conv weight [C, KW]
    alog_ptr, dtb_ptr,  # A_log [HV], dt_bias [HV]
    state_ptr,  # fp32 [B, HV, DK, DV] contiguous, in place
    o_ptr, s_o,  # [B, HV*DV] o = S^T q, rounded to the activation dtype
    scale,
    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, L2_EPS: tl.constexpr,
    PDL: tl.constexpr = 0,  # programmatic dependent launch mode (backend.pdl_launch, _pdl_triton.pdl_enter)
    STREAM: tl.constexpr = False,  # streaming cache hints on the state (fused_decode.STATE_STREAM_HINTS)
    PRECONV: tl.constexpr = False,  # qkv holds the conv outputs (conv_update_kernel ran): no conv state here
    AHEAD: tl.constexpr = 0,  # > 0: ask L2 for the state tile of the program this many places on (_prefetch_tile_ahead)
    EARLY: tl.constexpr = False,  # the state tile loaded first (in flight during the conv and gates), not last
    VFIRST: tl.constexpr = False,  # grid [DV / BV, HV, B] in the state's memory order, not [B, HV, DV / BV]
    WIDE: tl.constexpr = False,  # every state address formed in 64 bits (_state_tile_ptrs; to compare)
):  # fmt: skip
    """The delta-rule step of one batch row, value head and block of ``BV`` value columns (a ``[DK, BV]`` tile of
    the state; which, from the program ids: :func:`_tile_of_program`).

    Every program computes its head's q and k from the conv state without writing it (the value heads of a key
    head and the column blocks of a head all read them; :func:`gdn_finish_kernel` shifts them afterwards) and owns
    its block of v channels, which it shifts here. With ``PRECONV`` it reads q, k and v, already convolved, from
    ``qkv`` (the conv state is not touched).
    """
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    pdl_enter(PDL)
    if AHEAD > 0:
        _prefetch_tile_ahead(state_ptr, DK, DV, BK, BV, AHEAD, VFIRST)
    i_b, hv, i_v = _tile_of_program(VFIRST)
    i_b = i_b.to(tl.int64)
    v0 = i_v * BV
    i_hk = hv // (HV // HK)
    row = qkv_ptr + i_b * s_qkv
    cs = cs_ptr + i_b * s_cs_b
    nv = tl.minimum(DV - v0, BV)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    vm = rv < nv
    s_ptrs = _state_tile_ptrs(state_ptr, i_b * HV + hv, rk, v0, rv, DK, DV, WIDE)
    s_mask = (rk[:, None] < DK) & vm[None, :]
    if EARLY:
        S = _load_state(s_ptrs, s_mask, STREAM)
    if PRECONV:
        q = _load_channels(row, i_hk * DK, DK, BK)
        k = _load_channels(row, HK * DK + i_hk * DK, DK, BK)
        v = _load_channels(row, 2 * HK * DK + hv * DV + v0, nv, BV)
    else:
        q = _conv_silu_update(row, cs, w_ptr, i_hk * DK, DK, s_cs_c, s_cs_k, s_w_c, s_w_k, BK, KW, KWP, DTYPE, False)
        k = _conv_silu_update(
            row, cs, w_ptr, HK * DK + i_hk * DK, DK, s_cs_c, s_cs_k, s_w_c, s_w_k, BK, KW, KWP, DTYPE, False
        )
        v = _conv_silu_update(
            row, cs, w_ptr, 2 * HK * DK + hv * DV + v0, nv, s_cs_c, s_cs_k, s_w_c, s_w_k, BV, KW, KWP, DTYPE
        )
    q = _l2norm_scale(q, scale, L2_EPS)
    k = _l2norm_scale(k, 1.0, L2_EPS)
    beta = _rnd(tl.sigmoid(tl.load(b_ptr + i_b * s_b + hv).to(tl.float32)), DTYPE)
    a = tl.load(a_ptr + i_b * s_a + hv).to(tl.float32) + tl.load(dtb_ptr + hv).to(tl.float32)
    g = -tl.exp(tl.load(alog_ptr + hv).to(tl.float32)) * _softplus(a)
    if not EARLY:
        S = _load_state(s_ptrs, s_mask, STREAM)
    o = _delta_rule_head(s_ptrs, s_mask, S, q, k, v, tl.exp(g), beta, STREAM)
    pdl_release(PDL)
    tl.store(o_ptr + i_b * s_o + hv * DV + v0 + rv, _rnd(o, DTYPE).to(DTYPE), mask=vm)


@triton.jit
def gdn_finish_kernel(
    o_ptr, s_o,  # [B, HV*DV] from gdn_state_kernel
    z_ptr, s_z,  # [B, HV*DV]
    nw_ptr,  # norm weight [DV]
    qkv_ptr, s_qkv,  # [B, C] conv input: its q/k channels go into the conv state
    cs_ptr, s_cs_b, s_cs_c, s_cs_k,  # conv state [B, C, KW-1]
    out_ptr, s_out,  # [B, HV*DV]
    QK_PER: tl.constexpr,  # q/k conv channels shifted per program (2*HK*DK / HV, rounded up)
    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, BQ: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, NORM_EPS: tl.constexpr,
    PDL: tl.constexpr = 0,
    SHIFT: tl.constexpr = True,  # False after conv_update_kernel (PRECONV): the conv state is already shifted
):  # fmt: skip
    """Gated RMSNorm of value head ``program_id(1)`` of row ``program_id(0)``; then this program's share of the
    q/k conv channels shifted (every state program has read them: this kernel runs after)."""
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    pdl_enter(PDL)
    i_b = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1)
    rv = tl.arange(0, BV)
    vm = rv < DV
    o = tl.load(o_ptr + i_b * s_o + hv * DV + rv, mask=vm, other=0.0).to(tl.float32)
    zg = tl.load(z_ptr + i_b * s_z + hv * DV + rv, mask=vm, other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + rv, mask=vm, other=0.0).to(tl.float32)
    pdl_release(PDL)
    y = _gated_rmsnorm(o, zg, nw, DV, NORM_EPS, DTYPE)
    tl.store(out_ptr + i_b * s_out + hv * DV + rv, y.to(DTYPE), mask=vm)
    if SHIFT:
        c0 = hv * QK_PER
        n = tl.minimum(2 * HK * DK - c0, QK_PER)
        _conv_shift(qkv_ptr + i_b * s_qkv, cs_ptr + i_b * s_cs_b, c0, n, s_cs_c, s_cs_k, BQ, KW, KWP)


@triton.jit
def kda_state_kernel(
    q_ptr, s_q, k_ptr, s_k, v_ptr, s_v,  # [B, H*D] conv inputs, row strides
    f_ptr, s_f,  # [B, H*D] f_b_proj output (pre-gate)
    beta_ptr, s_beta,  # [B, H] beta_proj output (pre-sigmoid)
    qcs_ptr, kcs_ptr, vcs_ptr, s_cs_b, s_cs_c, s_cs_k,  # conv states [B, H*D, KW-1] (same strides)
    qw_ptr, kw_ptr, vw_ptr, s_w_c, s_w_k,  # conv weights [H*D, KW] (same strides)
    alog_ptr, dtb_ptr,  # A_log [H], dt_bias [H*D]
    state_ptr,  # fp32 [B, H, D, D] contiguous, in place
    o_ptr, s_o,  # [B, H*D] o = S^T q, rounded to the activation dtype
    scale,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr,
    L2_EPS: tl.constexpr,
    PDL: tl.constexpr = 0,
    STREAM: tl.constexpr = False,
    PRECONV: tl.constexpr = False,  # q, k, v hold the conv outputs (conv_update_kernel ran): no conv states here
    AHEAD: tl.constexpr = 0,  # > 0: ask L2 for the state tile of the program this many places on (_prefetch_tile_ahead)
    EARLY: tl.constexpr = False,  # the state tile loaded first (in flight during the conv and gates), not last
    VFIRST: tl.constexpr = False,  # grid [D / BV, H, B] in the state's memory order, not [B, H, D / BV]
    WIDE: tl.constexpr = False,  # every state address formed in 64 bits (_state_tile_ptrs; to compare)
):  # fmt: skip
    """The KDA step of one batch row, head and block of ``BV`` value columns (:func:`_tile_of_program`).
    q and k are read from their conv states (shifted later by :func:`kda_finish_kernel`); the v block is owned and
    shifted here. With ``PRECONV``, q, k and v are read as they are (already convolved)."""
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    pdl_enter(PDL)
    if AHEAD > 0:
        _prefetch_tile_ahead(state_ptr, D, D, BD, BV, AHEAD, VFIRST)
    i_b, i_h, i_v = _tile_of_program(VFIRST)
    i_b = i_b.to(tl.int64)
    v0 = i_v * BV
    c0 = i_h * D
    off_cs = i_b * s_cs_b
    nv = tl.minimum(D - v0, BV)
    r = tl.arange(0, BD)
    m = r < D
    rv = tl.arange(0, BV)
    vm = rv < nv
    s_ptrs = _state_tile_ptrs(state_ptr, i_b * H + i_h, r, v0, rv, D, D, WIDE)
    s_mask = m[:, None] & vm[None, :]
    if EARLY:
        S = _load_state(s_ptrs, s_mask, STREAM)
    if PRECONV:
        q = _load_channels(q_ptr + i_b * s_q, c0, D, BD)
        k = _load_channels(k_ptr + i_b * s_k, c0, D, BD)
        v = _load_channels(v_ptr + i_b * s_v, c0 + v0, nv, BV)
    else:
        q = _conv_silu_update(q_ptr + i_b * s_q, qcs_ptr + off_cs, qw_ptr, c0, D, s_cs_c, s_cs_k, s_w_c, s_w_k,
                              BD, KW, KWP, DTYPE, False)  # fmt: skip
        k = _conv_silu_update(k_ptr + i_b * s_k, kcs_ptr + off_cs, kw_ptr, c0, D, s_cs_c, s_cs_k, s_w_c, s_w_k,
                              BD, KW, KWP, DTYPE, False)  # fmt: skip
        v = _conv_silu_update(v_ptr + i_b * s_v, vcs_ptr + off_cs, vw_ptr, c0 + v0, nv, s_cs_c, s_cs_k, s_w_c,
                              s_w_k, BV, KW, KWP, DTYPE)  # fmt: skip
    q = _l2norm_scale(q, scale, L2_EPS)
    k = _l2norm_scale(k, 1.0, L2_EPS)
    f = tl.load(f_ptr + i_b * s_f + c0 + r, mask=m, other=0.0).to(tl.float32)
    f = f + tl.load(dtb_ptr + c0 + r, mask=m, other=0.0).to(tl.float32)
    g = -tl.exp(tl.load(alog_ptr + i_h).to(tl.float32)) * _softplus(f)  # [BD] per key channel
    beta = _rnd(tl.sigmoid(tl.load(beta_ptr + i_b * s_beta + i_h).to(tl.float32)), DTYPE)
    if not EARLY:
        S = _load_state(s_ptrs, s_mask, STREAM)
    o = _delta_rule_head(s_ptrs, s_mask, S, q, k, v, tl.exp(g)[:, None], beta, STREAM)
    pdl_release(PDL)
    tl.store(o_ptr + i_b * s_o + c0 + v0 + rv, _rnd(o, DTYPE).to(DTYPE), mask=vm)


@triton.jit
def kda_finish_kernel(
    o_ptr, s_o,  # [B, H*D] from kda_state_kernel
    gate_ptr, s_gate,  # [B, H*D]
    nw_ptr,  # norm weight [D]
    q_ptr, s_q, k_ptr, s_k,  # [B, H*D] conv inputs: their channels go into the q/k conv states
    qcs_ptr, kcs_ptr, s_cs_b, s_cs_c, s_cs_k,  # q/k conv states [B, H*D, KW-1]
    out_ptr, s_out,  # [B, H*D]
    D: tl.constexpr, BD: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, NORM_EPS: tl.constexpr,
    PDL: tl.constexpr = 0,
    SHIFT: tl.constexpr = True,  # False after conv_update_kernel (PRECONV): the conv states are already shifted
):  # fmt: skip
    """Gated RMSNorm of head ``program_id(1)`` of row ``program_id(0)``; then the head's q/k conv channels shifted."""
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    pdl_enter(PDL)
    i_b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * D
    r = tl.arange(0, BD)
    m = r < D
    o = tl.load(o_ptr + i_b * s_o + c0 + r, mask=m, other=0.0).to(tl.float32)
    gt = tl.load(gate_ptr + i_b * s_gate + c0 + r, mask=m, other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + r, mask=m, other=0.0).to(tl.float32)
    pdl_release(PDL)
    y = _gated_rmsnorm(o, gt, nw, D, NORM_EPS, DTYPE)
    tl.store(out_ptr + i_b * s_out + c0 + r, y.to(DTYPE), mask=m)
    if SHIFT:
        _conv_shift(q_ptr + i_b * s_q, qcs_ptr + i_b * s_cs_b, c0, D, s_cs_c, s_cs_k, BD, KW, KWP)
        _conv_shift(k_ptr + i_b * s_k, kcs_ptr + i_b * s_cs_b, c0, D, s_cs_c, s_cs_k, BD, KW, KWP)
