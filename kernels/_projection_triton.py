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
- ``GROUPED``: two products in one launch, ``[x W[:n1]^T | x2 W[n1:]^T]``: the programs of the columns from ``n1``
  (a multiple of ``BN``) on read their rows from a second input ``x2`` at a fixed offset from ``x`` (KDA's two
  low-rank gate up-projections, which would otherwise be two small launches of their own).
- ``ROPE``: an attention layer's packed ``[q | k | v]`` projection (heads of ``HD`` columns) with RoPE and the
  KV-cache write in its epilogue (what :func:`._rope_triton.rope_cache_write_kernel` does after the plain
  projection, one launch fewer). A program owns ``BN`` rotation pairs, columns ``j`` and ``j + HD/2`` of a head: it
  streams their two sets of weight rows into two accumulators (as ``GATED`` streams its two weights), rounds each
  product to the activation dtype as the plain projection's output is, rotates ``y * cos + partner * sin_signed``
  in fp32 (q and k columns) and stores q into the output, k and v into the caches at each row's slot.

Rounding follows the torch composition: each projection is rounded to the activation dtype, then SiLU, the
product and the residual add are each rounded again (``_rnd``), so results differ from cuBLAS only by the
fp32 summation order.

The RMSNorms between them (a block's mixer input and MLP input, the final norm before the LM head: 97 of a 48-layer
step) need no launch of their own: the projection that adds the residual writes what the next norm needs, and the
projection after the norm applies it.

- ``NORM_OUT`` (with ``RESIDUAL``): besides ``h = r + x W^T`` the epilogue writes ``hg = round(h * g)`` (``g``: the
  next norm's weight, ``[N]``) and its column block's partial sums of ``h^2`` per row (fp32, ``ssp[pid_n, :]``,
  zeros past ``M``).
- ``NORM``: the activation is ``hg``; each program loads the ``nss`` partial sums of squares before its main loop
  (they arrive while the weights stream) and adds them up after it, in a fixed order (deterministic), then scales
  the fp32 product by ``rsqrt(ss / K + eps)`` before the epilogue, so the result is ``rms_norm(h, g) W^T``. The
  main loop is the plain one: the activation goes from its load straight to ``tl.dot``. (Normalising inside the
  loop instead, from ``h``, halved the projection's speed on the H200: a per-tile row reduction or a scaling of the
  operand there breaks the software pipeline; results/decode_step_ab_normdiag_h200.json. Reducing the partials in
  the producer, in its last column block behind an arrival counter, put that block's atomic and reload on every
  producer's critical path: all-SWA batch 1 8.20 ms against 8.28 unfused;
  results/decode_step_ab_norm_lastblock_h200.json; the shipped order: 8.10, results/decode_step_ab_norm_h200.json.)

The reference (:func:`.norm.rms_norm`) rounds ``h * rsqrt(..)`` to the activation dtype, then its product with
``g``; here ``h * g`` is rounded once and the scale stays fp32: one rounding of the operand fewer, as close to the
exact result as the reference (tests/test_kernels_projection_triton.py), not bit-equal to it.

Split-K (``SPLIT > 1``; ``SPLIT = 1`` compiles the plain kernel above, unchanged). One program per column block is
too few programs for a skinny weight: the o_proj / MLP down weights ``[5120, 4096 / 14336]`` at ``BN = 64`` are 80
programs on the H200's 132 SMs, and 320 GDN in_proj blocks of 32 are 2.4 waves whose last is 40% full, so part of
the machine idles while the weight streams (63-85% of copy bandwidth for those shapes, against 103% for the LM
head's 2048 blocks). The grid becomes ``(cdiv(N, BN), SPLIT)``: program ``(pid_n, pid_k)`` accumulates the
``pid_k``-th K range, ranges of ``cdiv(cdiv(K, SPLIT), BK) * BK`` (whole ``BK`` steps, so ``EVEN_K`` still holds
for each; the masks use the range's end; trailing ranges may be short or empty). The reduction is a serial fixup
with a semaphore, as CUTLASS's split-K "serial" mode and stream-K do, in the same launch:

- each program stores its fp32 partial(s) (``acc``, and ``acc2`` when ``GATED``; rows ``< M``) into the workspace
  ``ws[pid_k, pid_n]`` (fp32 ``[SPLIT, cdiv(N, BN), 1 or 2, M, BN]``, ``torch.empty`` per call: from the graph's
  pool under CUDA-graph capture), then a CTA barrier and ``atomic_add(lock[pid_n], 1)`` (acq_rel, gpu scope);
- the program that reads ``SPLIT - 1`` back arrived last: it reads the ``SPLIT`` partials (``.cg``: from L2,
  past the SM's L1) and sums them in the fixed order ``0 .. SPLIT-1`` in fp32, so the result does not depend
  on which program came last (deterministic, run to run and replay to replay; it differs from ``SPLIT = 1``
  by the fp32 summation order only), runs the same epilogue as ``SPLIT = 1`` and stores the output, then resets
  ``lock[pid_n]`` to 0 (``atomic_xchg``) so the next launch, or CUDA-graph replay, finds zeros.

No program waits for another (the others just exit), so there is no deadlock whatever the scheduling. The lock
buffer (int32 zeros, one per column block) persists per device in :mod:`.projection`; launches on one stream are
serialized, so one buffer serves them all. The extra traffic, ``SPLIT * M * N * 4`` bytes of fp32 partials written
and read back (twice that when ``GATED``; mostly L2 hits), is small against the ``N * K * 2`` bytes of weight.
Checked on the H200 (Triton 3.6): the PTX is the partial stores, ``bar.sync``, one thread's
``atom.global.gpu.acq_rel.add`` broadcast through shared memory behind another ``bar.sync``, then ``ld.global.cg``.

``rms_norm_kernel``: one program per row; fp32 statistics, the normalised row rounded to the input dtype,
then multiplied by the weight (rounded again), as :func:`.norm.rms_norm` does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._fused_decode_triton import _rnd
from ._pdl_triton import pdl_enter, pdl_release, prefetch_rows_l2, prefetch_share_l2


@triton.jit
def _skinny_epilogue(
    acc, acc2, b_ptr, r_ptr, s_rm, o_ptr, s_om, rm, rn, mm, nm,
    DTYPE: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    NORM_OUT: tl.constexpr, gn_ptr, hg_ptr, s_hg, ssp_ptr, BM: tl.constexpr,
):  # fmt: skip
    """Bias, rounding, gating and residual on the fp32 product(s) ``acc`` (``acc2``: GATED's second), then the store
    of ``o[rm, rn]`` (the same code for ``SPLIT = 1`` and the split-K fixup); with ``NORM_OUT`` also ``hg`` and the
    row sums of squares for the next RMSNorm (see the module docstring)."""
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
    if NORM_OUT:
        gn = tl.load(gn_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        tl.store(hg_ptr + rm[:, None] * s_hg + rn[None, :], _rnd(y * gn[None, :], DTYPE).to(DTYPE), mask=omask)
        # all BM rows (zeros past M), so the consumer reads whole [SSB, BM] tiles
        tl.store(ssp_ptr + tl.program_id(0) * BM + rm, tl.sum(tl.where(omask, y * y, 0.0), axis=1))


@triton.jit
def _rope_cache_epilogue(
    acc, acc2, rm, rn, mm, nm, q_ptr, s_q, nq, nk, cos_ptr, sin_ptr, s_tab, slot_ptr, kc_ptr, vc_ptr, s_cb, s_cs,
    s_ch, DTYPE: tl.constexpr, HD: tl.constexpr,
):  # fmt: skip
    """``ROPE``'s epilogue: the products of columns ``rn`` (first halves of heads) and ``rn + HD/2`` rounded to the
    activation dtype; q and k columns rotated (``y * cos + partner * sin_signed`` in fp32, rounded again), as
    :func:`._rope_triton.rope_cache_write_kernel` does; q stored to ``q_ptr [M, nq]``, k and v to the caches at
    ``[row, slot[row], head]``."""
    HALF: tl.constexpr = HD // 2
    y1 = _rnd(acc, DTYPE)
    y2 = _rnd(acc2, DTYPE)
    j = rn % HD  # < HALF
    tab = rm[:, None] * s_tab + j[None, :]
    tmask = mm[:, None] & nm[None, :]
    c1 = tl.load(cos_ptr + tab, mask=tmask, other=0.0)
    s1 = tl.load(sin_ptr + tab, mask=tmask, other=0.0)
    c2 = tl.load(cos_ptr + tab + HALF, mask=tmask, other=0.0)
    s2 = tl.load(sin_ptr + tab + HALF, mask=tmask, other=0.0)
    rot = (rn < nq + nk)[None, :]
    o1 = tl.where(rot, _rnd(y1 * c1 + y2 * s1, DTYPE), y1)
    o2 = tl.where(rot, _rnd(y2 * c2 + y1 * s2, DTYPE), y2)
    is_q = (rn < nq)[None, :]
    qdst = q_ptr + rm[:, None] * s_q + rn[None, :]
    tl.store(qdst, o1.to(q_ptr.dtype.element_ty), mask=tmask & is_q)
    tl.store(qdst + HALF, o2.to(q_ptr.dtype.element_ty), mask=tmask & is_q)
    c = rn - nq  # column in k, then (from nk on) in v
    is_k = c < nk
    c = tl.where(is_k, c, c - nk)
    slot = tl.load(slot_ptr + rm, mask=mm, other=0).to(tl.int64)
    cdst = rm.to(tl.int64)[:, None] * s_cb + slot[:, None] * s_cs + ((c // HD) * s_ch + c % HD)[None, :]
    kmask = tmask & (rn >= nq)[None, :] & is_k[None, :]
    vmask = tmask & (rn >= nq)[None, :] & ~is_k[None, :]
    tl.store(kc_ptr + cdst, o1.to(kc_ptr.dtype.element_ty), mask=kmask)
    tl.store(kc_ptr + cdst + HALF, o2.to(kc_ptr.dtype.element_ty), mask=kmask)
    tl.store(vc_ptr + cdst, o1.to(vc_ptr.dtype.element_ty), mask=vmask)
    tl.store(vc_ptr + cdst + HALF, o2.to(vc_ptr.dtype.element_ty), mask=vmask)


@triton.jit
def skinny_linear_kernel(
    x_ptr, s_xm,  # [M, K] activation, row stride (unit column stride)
    w_ptr, s_wn,  # [N, K] weight, row stride (unit column stride)
    w2_ptr, s_w2n,  # [N, K] second weight (GATED only)
    b_ptr,  # [N] bias (HAS_BIAS only; added before the rounding, as cuBLAS's epilogue does)
    r_ptr, s_rm,  # [M, N] residual (RESIDUAL only)
    o_ptr, s_om,  # [M, N] output
    ws_ptr,  # fp32 [SPLIT, cdiv(N, BN), 2 if GATED else 1, M, BN] partial products (SPLIT > 1 only)
    lock_ptr,  # int32 [>= cdiv(N, BN)] arrival counters, zero between launches (SPLIT > 1 only)
    M, N, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr,
    GATED: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,  # True only in the interpreter, whose tl.dot mishandles bf16 operands
    PDL: tl.constexpr = 0,  # programmatic dependent launch mode (backend.pdl_launch, _pdl_triton.pdl_enter)
    PREFETCH: tl.constexpr = 0,  # under PDL: 128-byte lines per weight row asked of L2 before the wait
    NORM: tl.constexpr = False,  # x is round(h * g) for rows h: rms_norm(h, g) W^T
    ss_ptr=None,  # fp32 [nss, BM] partial sums of squares of the rows h, by column block of h (NORM only)
    nss=0,  # their number (NORM only)
    SSB: tl.constexpr = 1,  # a power of two >= nss (NORM only)
    eps=0.0,  # added to the mean square (NORM only)
    NORM_OUT: tl.constexpr = False,  # with RESIDUAL: also hg = round(h * gn) and the partial sums of squares
    gn_ptr=None,  # [N] the next norm's weight (NORM_OUT only)
    hg_ptr=None, s_hg=0,  # [M, N] round(h * gn), row stride (NORM_OUT only)
    ssp_ptr=None,  # fp32 [cdiv(N, BN), BM] per-column-block row sums of squares of h (NORM_OUT only)
    GROUPED: tl.constexpr = False,  # columns from n1 on take their rows at x_ptr + x2_off (a second input)
    n1=0,  # a multiple of BN (GROUPED only)
    x2_off=0,  # elements from x to the second input, same strides (GROUPED only)
    pf_ptr=None,  # a tensor the next kernels read, asked of L2 once past the main loop (PF_LINES > 0 only)
    pf_n=0,  # its elements
    PF_ELEMS: tl.constexpr = 32,  # its elements per 128-byte line
    PF_LINES: tl.constexpr = 0,  # lines per program (the grid covers the tensor: prefetch_share_l2)
    ROPE: tl.constexpr = False,  # q/k/v with RoPE and the KV-cache write (see the module docstring); SPLIT = 1
    HD: tl.constexpr = 128,  # head size (ROPE only)
    nq=0, nk=0,  # q columns H * HD, k columns HKV * HD; v columns follow (ROPE only)
    cos_ptr=None, sin_ptr=None, s_tab=0,  # fp32 [M, HD] tables, sin with its first half negated (ROPE only)
    slot_ptr=None,  # [M] cache slot of each row's token (ROPE only)
    kc_ptr=None, vc_ptr=None, s_cb=0, s_cs=0, s_ch=0,  # caches [M, S, HKV, HD], the same strides (ROPE only)
):  # fmt: skip
    """``o[:, n0:n0+BN] = epilogue(x @ W[n0:n0+BN].T)`` for ``n0 = program_id(0) * BN``; with ``SPLIT > 1``,
    program ``(pid_n, pid_k)`` sums the ``pid_k``-th of ``SPLIT`` K ranges and the last to arrive reduces; ``NORM``
    and ``NORM_OUT``: the RMSNorm between two projections (see the module docstring)."""
    tl.static_assert(not NORM_OUT or RESIDUAL, "NORM_OUT writes the residual sum's norm inputs")
    tl.static_assert(
        not ROPE or (SPLIT == 1 and not (GATED or RESIDUAL or HAS_BIAS)), "ROPE: a plain unsplit projection"
    )
    TWO: tl.constexpr = GATED or ROPE  # two accumulators
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    mm = rm < M
    if ROPE:  # pairs pid * BN ..: columns j of the heads' first halves (rn) and j + HD / 2 (rn2)
        rp = pid * BN + tl.arange(0, BN)
        rn = (rp // (HD // 2)) * HD + rp % (HD // 2)
        rn2 = rn + HD // 2
        nm = rp < N // 2
    else:
        rn = pid * BN + tl.arange(0, BN)
        rn2 = rn
        nm = rn < N
    x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :]
    if GROUPED:
        x_ptrs += (pid * BN >= n1).to(tl.int64) * x2_off
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * s_wn + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TWO:
        w2_ptrs = w2_ptr + rn2.to(tl.int64)[:, None] * s_w2n + rk[None, :]
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc2 = acc  # unused
    if SPLIT == 1:
        k_lo = 0
        k_hi = K
    else:
        # K range [k_lo, k_hi) of this split: chunks of whole BK steps, so every range but the one ending at K is
        # a multiple of BK long and EVEN_K (K % BK == 0) still means no masks; trailing ranges may be empty.
        pid_k = tl.program_id(1)
        chunk = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
        k_lo = pid_k * chunk
        k_hi = tl.minimum(K, k_lo + chunk)
        x_ptrs += k_lo
        w_ptrs += k_lo
        if GATED:
            w2_ptrs += k_lo
    if PDL and PREFETCH > 0:  # the weights are no kernel's output: their first lines may stream before the wait
        prefetch_rows_l2(w_ptr, s_wn, rn, N, k_lo, k_hi, PREFETCH)
        if GATED:
            prefetch_rows_l2(w2_ptr, s_w2n, rn, N, k_lo, k_hi, PREFETCH)
    pdl_enter(PDL)
    if NORM:  # in flight while the weights stream; summed after the loop
        rs = tl.arange(0, SSB)
        ssp = tl.load(ss_ptr + rs[:, None] * BM + rm[None, :], mask=(rs < nss)[:, None], other=0.0)
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mm[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=nm[:, None], other=0.0)
        else:
            km = (k0 + rk) < k_hi
            x = tl.load(x_ptrs, mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=nm[:, None] & km[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
        if TWO:
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
    pdl_release(PDL)
    if PF_LINES > 0:  # this program's weights are read: its share of the next kernel's input streams meanwhile
        prefetch_share_l2(pf_ptr, pf_n, PF_ELEMS, PF_LINES)
    if NORM:  # (with SPLIT > 1 the partial products are scaled: the sum of scaled partials is the same scaling)
        r = tl.rsqrt(tl.sum(ssp, axis=0) / K + eps)[:, None]
        acc *= r
        if TWO:
            acc2 *= r
    if ROPE:
        _rope_cache_epilogue(
            acc, acc2, rm, rn, mm, nm, o_ptr, s_om, nq, nk, cos_ptr, sin_ptr, s_tab, slot_ptr, kc_ptr, vc_ptr,
            s_cb, s_cs, s_ch, DTYPE, HD,
        )  # fmt: skip
    elif SPLIT == 1:
        _skinny_epilogue(
            acc, acc2, b_ptr, r_ptr, s_rm, o_ptr, s_om, rm, rn, mm, nm, DTYPE, GATED, RESIDUAL, HAS_BIAS,
            NORM_OUT, gn_ptr, hg_ptr, s_hg, ssp_ptr, BM,
        )  # fmt: skip
    else:
        # Serial split-K fixup: publish the partial tile(s) (rows < M only), count arrivals per column block; the
        # last program to arrive sums the SPLIT partials in the fixed order 0..SPLIT-1 (deterministic whichever
        # program is last), runs the epilogue and re-arms the counter for the next launch / graph replay.
        NACC: tl.constexpr = 2 if GATED else 1
        tile = M * BN  # elements of one [M, BN] partial
        wmask = mm[:, None]
        ws_tile = ws_ptr + rm[:, None] * BN + tl.arange(0, BN)[None, :]
        own = ws_tile + (pid_k * tl.num_programs(0) + pid).to(tl.int64) * (NACC * tile)
        tl.store(own, acc, mask=wmask)
        if GATED:
            tl.store(own + tile, acc2, mask=wmask)
        # Every thread's partial stores precede the (single-thread) release below: bar.sync, then the gpu-scope
        # acq_rel atomic (CUTLASS's semaphore pattern: __syncthreads(); thread 0: fence + atomic).
        tl.debug_barrier()
        cnt = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT - 1:
            tl.debug_barrier()  # the acquire (one thread) before any thread reads the other programs' partials
            first = ws_tile + pid.to(tl.int64) * (NACC * tile)
            step = tl.num_programs(0).to(tl.int64) * (NACC * tile)  # from one split's partials to the next
            tot = tl.load(first, mask=wmask, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT):
                tot += tl.load(first + i * step, mask=wmask, other=0.0, cache_modifier=".cg")
            tot2 = tot
            if GATED:
                tot2 = tl.load(first + tile, mask=wmask, other=0.0, cache_modifier=".cg")
                for i in tl.static_range(1, SPLIT):
                    tot2 += tl.load(first + i * step + tile, mask=wmask, other=0.0, cache_modifier=".cg")
            _skinny_epilogue(
                tot, tot2, b_ptr, r_ptr, s_rm, o_ptr, s_om, rm, rn, mm, nm, DTYPE, GATED, RESIDUAL, HAS_BIAS,
                NORM_OUT, gn_ptr, hg_ptr, s_hg, ssp_ptr, BM,
            )  # fmt: skip
            # All SPLIT programs have arrived: re-armed for the next launch on the stream (or graph replay).
            tl.atomic_xchg(lock_ptr + pid, 0)


@triton.jit
def rms_norm_kernel(
    x_ptr, s_x,  # [M, D]
    w_ptr,  # [D]
    o_ptr, s_o,  # [M, D]
    D, eps,
    BD: tl.constexpr,
    PDL: tl.constexpr = 0,
):  # fmt: skip
    """``o[m] = round(x[m] * rsqrt(mean(x[m]^2) + eps)) * w`` for ``m = program_id(0)`` (fp32 statistics)."""
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BD)
    m = r < D
    x = tl.load(x_ptr + row * s_x + r, mask=m, other=0.0).to(tl.float32)
    pdl_release(PDL)
    y = _rnd(x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps), DTYPE)
    w = tl.load(w_ptr + r, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * s_o + r, _rnd(y * w, DTYPE).to(DTYPE), mask=m)
