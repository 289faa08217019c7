"""Fused GDN and KDA decode steps: everything between the input projections and the output projection.

One call does, for every batch row and head: the causal conv state update (shift in place, append the new
column) and conv output + SiLU of q, k, v; L2 norm of q and k (``x / sqrt(sum x^2 + 1e-6)``) and q scaling; the
gates in fp32 (GDN: ``g = -exp(A_log) * softplus(a + dt_bias)`` per head; KDA: the same per key channel) and
``beta = sigmoid(.)``; the delta-rule update of the fp32 state IN PLACE; ``o = S^T q``; and the gated output
norm ``rmsnorm(o) * norm_weight * silu(gate)``. The result ``[B, HV*DV]`` goes straight into the output
projection.

Backends:

- ``"torch"``: the composition of the existing ops (:func:`.conv.causal_conv1d_update`,
  :func:`.delta_rule.delta_rule_step_torch`, :func:`.norm.rms_norm`); the reference and the CPU path.
- ``"fla"``: the same composition with fla's fused-recurrent step for the delta rule (CUDA; the runtime's path
  before the fused kernels).
- ``"triton"``: two Triton launches (:mod:`._fused_decode_triton`): the state update split over value-column
  blocks, then the gated norm and the shared q/k conv shift. From :data:`PRECONV_MIN_ROWS` rows up, three: the
  conv step of every q/k/v channel first (one launch, KDA's three inputs included), so that the state programs read
  q, k and v instead of each convolving its own (q and k of a head are shared by all its programs). On CPU tensors
  only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how the tests
  run it.
- ``"auto"``: on CUDA :data:`AUTO_CUDA_BACKEND` (``"triton"``, checked and timed on the H200 by
  ``benchmarks/bench_decode_kernels.py``; ``"fla"`` when triton is missing); ``"torch"`` on CPU.

All paths are CUDA-graph capturable: static shapes, no host sync, states updated in place.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import pdl_launch, sm_count, triton_available
from .conv import causal_conv1d_update
from .delta_rule import L2NORM_EPS, delta_rule_step_torch, gated_delta_rule_step, gdn_gate
from .kda import kda_gate, kda_step
from .norm import rms_norm

FUSED_BACKENDS = ("auto", "torch", "fla", "triton")


def _triton_module() -> ModuleType:
    return importlib.import_module(f"{__package__}._fused_decode_triton")


#: What ``auto`` picks on CUDA: the fused Triton kernels, checked on the H200 against the torch reference
#: (output rel. error <= 1.1e-4, state <= 4.4e-5, bf16) and faster than fla in place at every batch
#: (GDN 1.5x, KDA 1.8x at B=1024; 6.9x / 13x at B=1): results/decode_kernels_h200.json.
AUTO_CUDA_BACKEND = "triton"


def resolve_fused_backend(backend: str, device: torch.device) -> str:
    """Resolve a fused-decode backend to ``"torch"``, ``"fla"`` or ``"triton"``."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"unknown fused decode backend {backend!r}; expected one of {FUSED_BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if AUTO_CUDA_BACKEND == "triton" and triton_available():
            return "triton"
        return "fla" if _fla_importable() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend 'triton' needs triton (pip install 'placement-search[gpu]')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)"
            )
    if backend == "fla" and device.type != "cuda":
        raise ValueError("backend 'fla' needs CUDA tensors")
    return backend


def _fla_importable() -> bool:
    try:
        importlib.import_module("fla.ops")
    except ImportError:
        return False
    return True


def _triton_fits(state: Tensor, act_dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take these tensors (fp32 contiguous state; fp32/bf16/fp16 activations)."""
    return (
        state.dtype == torch.float32
        and state.is_contiguous()
        and act_dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def _resolve(backend: str, state: Tensor, act_dtype: torch.dtype) -> str:
    """``auto`` falls back to ``torch`` when the Triton kernels cannot take the tensors (e.g. float64 tests)."""
    resolved = resolve_fused_backend(backend, state.device)
    if backend == "auto" and resolved == "triton" and not _triton_fits(state, act_dtype):
        return "torch"
    return resolved


def _weight2d(w: Tensor) -> Tensor:
    """Conv weight ``[C, 1, K]`` or ``[C, K]`` -> ``[C, K]`` (a view)."""
    return w[:, 0] if w.dim() == 3 else w


def _check_rows(name: str, t: Tensor, batch: int, width: int) -> None:
    if t.dim() != 2 or t.shape[0] != batch or t.shape[1] != width or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be [{batch}, {width}] with unit channel stride, got {tuple(t.shape)} {t.stride()}"
        )


def _check_state(state: Tensor, shape: tuple[int, ...], triton_path: bool) -> None:
    if tuple(state.shape) != shape:
        raise ValueError(f"state must be {shape}, got {tuple(state.shape)}")
    if triton_path and (state.dtype != torch.float32 or not state.is_contiguous()):
        raise ValueError("the triton backend updates a contiguous fp32 state in place")


#: Value columns per program of the Triton state kernels (a ``[DK, BLOCK_V]`` fp32 tile per program), and below
#: ``SMALL_BATCH`` rows half as many (more programs where there are few): on the H200 at the 15B sizes 64 columns
#: beat 16, 32 and 128 from batch 16 up (GDN B=1024: 1.42 ms vs 1.56 (32), 1.48 (128)), 16-32 at batch 1 (7.1-7.6
#: us vs 8.2): results/decode_kernels_h200.json.
BLOCK_V = 64
SMALL_BATCH = 16
#: Streaming cache hints on the recurrent state in the Triton state kernels (loads evict-first, stores ``.cs``):
#: the state is read and written once per step, so it need not stay in L2. Off: on the H200 the kernels alone gain
#: 8-13% at batch 16 but KDA loses 3-4% at 256-1024, and the whole 15B step moves by under 0.1%
#: (results/decode_kernels_stream_h200.json, results/decode_step_ab_tattn_stream_h200.json).
STATE_STREAM_HINTS = False
#: A cap on the registers a thread of the Triton state kernels may use (Triton's ``maxnreg``; None: the compiler's
#: choice, 121-128 for GDN's 128 x 64 tile since session 17's addressing, four programs per SM on sm_90). Measured in
#: session 13, when the choice was 159 (three programs an SM): 128 let four share an SM, with 56-160 bytes a thread
#: spilled (``benchmarks/kernel_resources.py``), and every cap made the step slower on the H200 (all-GDN +0.9% /
#: +9.0% / +17.3% at 16 / 64 / 256 rows with 128: results/decode_step_ab_sr_h200.json); the addressing
#: (:data:`STATE_WIDE_ADDRESSES`) reaches four without spills.
STATE_MAX_REGISTERS: int | None = None
#: Programs an SM holds of the Triton state kernels, for their L2 lookahead: where the grid is larger than the GPU
#: holds at once (``SMs x STATE_LOOKAHEAD_PER_SM`` programs), each program first asks L2 for the state tile of
#: the program that many places on, so that the next wave's loads hit L2. 0: off (to compare:
#: ``benchmarks/ab_decode_step.py`` knob ``+sa<N>``). Off: on the H200 (whole 32K step) 3 (one wave ahead) made
#: all-GDN / all-KDA 1.2% / 1.1% slower at 16 rows and 3.0% / 2.8% at 64; 6 (two waves), 0.7% / 0.6% and 5.2% /
#: 4.2% (results/decode_step_ab_sa_h200.json).
STATE_LOOKAHEAD_PER_SM = 0
#: Whether the Triton state kernels load their state tile first, in flight while they compute the conv, norms and
#: gates, instead of after them (knob ``+es<N>``: from ``N`` rows up; None: never). Not used: on the H200 (whole
#: 32K step) all-GDN +0.2% at batch 1 and +3.2% at 16 (239 registers a thread for the 64-column tile: two
#: programs an SM, not three), all-KDA -0.1% / +3.1% (results/decode_step_ab_es_h200.json). Its logits differ from
#: the default's by 3-5e-2 (relative) though the load is after the PDL wait: the compiler contracts the products
#: differently, and 48 random layers amplify an fp32 ulp that flips a bf16 rounding.
STATE_EARLY_LOAD_MIN_ROWS: int | None = None
#: From this many rows up (None: never) the Triton state kernels' grid runs in the state's memory order
#: (``[DV / BV, H, B]``: the value blocks of a head, then the heads of a row, next to each other in launch order, so
#: that each wave of programs reads one contiguous stretch of the ``[B, H, DK, DV]`` state) instead of
#: ``[B, H, DV / BV]`` (a wave reads the first value block of every row's first heads: part of each 512-byte state
#: row, the rest a wave or more later). Knob ``+vf<N>`` of ``benchmarks/ab_decode_step.py``. On the H200 (whole
#: 32K step, A against B, bit-equal): all-GDN -0.12..-0.19% at 16 rows and -0.43..-0.58% at 64, all-KDA
#: -0.15..-0.16% and -0.66..-0.76%, mixed -0.07% at 16; at batch 1 (32-column blocks, the state already asked of L2)
#: +0.15..+0.34%, hence from 16 rows (results/decode_step_ab_vf_h200.json, decode_step_ab_spp_h200.json,
#: decode_step_ab_vfmixed_h200.json).
STATE_GRID_MEMORY_ORDER_MIN_ROWS: int | None = 16
#: Whether the Triton state kernels form every state address in 64 bits from the row index (the form used until
#: session 17; knob ``+wide``) instead of one 64-bit base per state matrix plus 32-bit offsets
#: (``_fused_decode_triton._state_tile_ptrs``). The 64-bit form kept the tile's addresses live across the update:
#: 158 registers a thread for GDN's 128 x 64 tile (three programs an SM), against 121 (four) with the base
#: (results/kernel_resources_sm90.json; the H200 machine's Triton 3.6: 128, kernel_resources_sm90_triton36.json).
#: On the H200 (whole 32K step, A against B, bit-equal) the base made all-GDN 0.65% / 0.74% faster at 16 / 64 rows,
#: all-KDA 0.76% / 0.78% (0.31% at batch 1), mixed 0.21% at 16 rows (results/decode_step_ab_wide_h200.json).
STATE_WIDE_ADDRESSES = False
#: Warps per program of the Triton state kernels (None: from the tile, :func:`_launch_kw`) and of the finish
#: kernels (knobs ``+sw<N>``, ``+fw<N>``). On the H200 (whole 32K step, 16-64 rows): 32-column state tiles on 2 warps
#: (six programs an SM) 0.1-0.4% slower than 64 columns on 4; finish kernels on 1 or 2 warps within -0.06..+0.12%
#: of 4 (results/decode_step_ab_sw_h200.json).
STATE_NUM_WARPS: int | None = None
FINISH_NUM_WARPS = 4
#: From this many rows up the conv step runs as a launch of its own (``conv_update_kernel``: conv, SiLU, state shift
#: over all q/k/v channels at once) and the state kernels read its outputs (``PRECONV``), instead of each state
#: program convolving its own q, k (shared with the other programs of its head) and v. On the H200 at 15B sizes
#: (results/decode_step_ab_preconv_h200.json, whole 32K decode step): all-GDN 0.9% faster at 64 rows, 1.7% at 256,
#: 2.4% at 512, all-KDA 0.1%, 1.0%, 1.5%; at 16 rows 1.0% / 0.6% slower, at 32 even.
PRECONV_MIN_ROWS = 64
#: Rows and channels per program of the conv launch (GDN's 6144 channels on the H200: 7.7 us at 64 rows, 15.9 at
#: 256, 52 at 1024, against 8.7 / 19.9 / 64 for 4 x 256; results/state_kernel_h200.json).
CONV_ROWS, CONV_BLOCK = 2, 512
#: Warps per program of the conv launch (at 2 x 512 and 4 warps: 112 registers a thread, 4 programs an SM;
#: results/kernel_resources_sm90.json. 8 warps: 62 registers, 4 programs, twice the warps; not yet timed).
CONV_WARPS = 4


def _block_v(dv: int, block_v: int | None, batch: int) -> int:
    default = BLOCK_V if batch >= SMALL_BATCH else BLOCK_V // 2
    return min(_next_pow2(dv), _next_pow2(block_v or default))


def _lookahead(state: Tensor, programs: int) -> int:
    """The state kernels' ``AHEAD``: the programs the GPU holds at once (:data:`STATE_LOOKAHEAD_PER_SM` per SM) when
    the grid has more (0 otherwise: one wave has nothing to fetch for)."""
    if not STATE_LOOKAHEAD_PER_SM or state.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    ahead = STATE_LOOKAHEAD_PER_SM * sm_count(state.device)
    return ahead if programs > ahead else 0


def _state_grid(batch: int, heads: int, blocks: int) -> tuple[tuple[int, int, int], bool]:
    """The state kernels' grid and their ``VFIRST`` (:data:`STATE_GRID_MEMORY_ORDER_MIN_ROWS`; the rows then on the
    grid's third axis, which CUDA caps at 65535)."""
    order = STATE_GRID_MEMORY_ORDER_MIN_ROWS
    if order is not None and order <= batch <= 65535:
        return (blocks, heads, batch), True
    return (batch, heads, blocks), False


def _early(batch: int) -> bool:
    """The state kernels' ``EARLY`` at ``batch`` rows (:data:`STATE_EARLY_LOAD_MIN_ROWS`)."""
    return STATE_EARLY_LOAD_MIN_ROWS is not None and batch >= STATE_EARLY_LOAD_MIN_ROWS


def _launch_kw(bk: int, bv: int, num_warps: int | None) -> dict[str, int]:
    """Warps for a ``[BK, BV]`` fp32 state tile held in registers: about 32 elements (and their addresses) per
    thread unless ``num_warps`` is given, capped at 4 warps: on the H200 at 128 x 128 tiles 4 warps beat 8 and 16 at
    every batch (results/decode_kernels_h200.json: GDN B=1024 1.34 ms vs 1.71 (8) and 2.21 (16))."""
    if num_warps is None:
        num_warps = STATE_NUM_WARPS or max(1, min(4, (bk * bv) // (32 * 32)))
    return {"num_warps": num_warps, **({"maxnreg": STATE_MAX_REGISTERS} if STATE_MAX_REGISTERS else {})}


def gdn_decode_step(
    qkv: Tensor,
    z: Tensor,
    b: Tensor,
    a: Tensor,
    conv_state: Tensor,
    conv_weight: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    norm_weight: Tensor,
    state: Tensor,
    *,
    norm_eps: float,
    scale: float | None = None,
    backend: str = "auto",
    num_warps: int | None = None,
    block_v: int | None = None,
) -> Tensor:
    """One GDN decode token after ``in_proj_qkvz`` / ``in_proj_ba``; conv and recurrent states updated IN PLACE.

    Key heads ``HK`` follow from the shapes: ``C = 2*HK*DK + HV*DV``. Value head h uses key head
    ``h // (HV // HK)``.

    Args:
        qkv: ``[B, C]`` conv input, flat ``[Q (HK*DK) | K (HK*DK) | V (HV*DV)]`` (a row-strided slice is fine).
        z: ``[B, HV*DV]`` output gate (row-strided slice fine).
        b: ``[B, HV]`` beta logits (``beta = sigmoid(b)``).
        a: ``[B, HV]`` decay input (``g = -exp(A_log) * softplus(a + dt_bias)``, fp32).
        conv_state: ``[B, C, K-1]`` previous conv inputs, oldest first; shifted in place.
        conv_weight: ``[C, K]`` or ``[C, 1, K]``.
        A_log, dt_bias: ``[HV]``.
        norm_weight: ``[DV]``.
        state: ``[B, HV, DK, DV]`` fp32 recurrent state (contiguous for ``"triton"``); updated in place.
        norm_eps: epsilon of the gated RMSNorm.
        scale: query scale, default ``DK ** -0.5``.
        backend: ``"auto"``, ``"torch"``, ``"fla"``, ``"triton"`` (see the module docstring).
        num_warps: Triton launch width (default from the tile size); ignored by the other backends.
        block_v: value columns per program of the Triton state kernel (default :data:`BLOCK_V`, half below ``SMALL_BATCH`` rows).

    Returns:
        ``[B, HV*DV]`` in z.dtype: ``rmsnorm(o) * norm_weight * silu(z)`` per value head, ready for ``out_proj``.
    """
    B, HV, DK, DV = state.shape
    C = qkv.shape[-1]
    HK = (C - HV * DV) // (2 * DK)
    if HK < 1 or 2 * HK * DK + HV * DV != C or HV % HK:
        raise ValueError(f"qkv width {C} does not fit HV={HV}, DK={DK}, DV={DV} with HV a multiple of HK")
    scale = DK**-0.5 if scale is None else scale
    w = _weight2d(conv_weight)
    resolved = _resolve(backend, state, z.dtype)
    if resolved == "triton":
        for name, t, width in (("qkv", qkv, C), ("z", z, HV * DV), ("b", b, HV), ("a", a, HV)):
            _check_rows(name, t, B, width)
        _check_state(state, (B, HV, DK, DV), True)
        if conv_state.shape != (B, C, w.shape[1] - 1):
            raise ValueError(f"conv_state must be {(B, C, w.shape[1] - 1)}, got {tuple(conv_state.shape)}")
        tk, pdl = _triton_module(), pdl_launch(state.device)
        o = torch.empty(B, HV * DV, dtype=z.dtype, device=z.device)
        out = torch.empty_like(o)
        bk, bv, kw = _next_pow2(DK), _block_v(DV, block_v, B), w.shape[1]
        cs_strides = (conv_state.stride(0), conv_state.stride(1), conv_state.stride(2))
        pre = B >= PRECONV_MIN_ROWS
        x = _conv_launch(tk, pdl, (qkv,), (conv_state,), (w,))[0] if pre else qkv  # the state kernel's q/k/v input
        grid, vfirst = _state_grid(B, HV, -(-DV // bv))
        tk.gdn_state_kernel[grid](
            x, x.stride(0), b, b.stride(0), a, a.stride(0), conv_state, *cs_strides,
            w, w.stride(0), w.stride(1), A_log, dt_bias, state, o, o.stride(0), scale,
            HK=HK, HV=HV, DK=DK, DV=DV, BK=bk, BV=bv, KW=kw, KWP=_next_pow2(kw), L2_EPS=L2NORM_EPS,
            STREAM=STATE_STREAM_HINTS, PRECONV=pre, AHEAD=_lookahead(state, math.prod(grid)), EARLY=_early(B),
            VFIRST=vfirst, WIDE=STATE_WIDE_ADDRESSES, **_launch_kw(bk, bv, num_warps), **pdl,
        )  # fmt: skip
        qk_per = -(-2 * HK * DK // HV)  # q/k conv channels each finishing program shifts
        tk.gdn_finish_kernel[(B, HV)](
            o, o.stride(0), z, z.stride(0), norm_weight, qkv, qkv.stride(0), conv_state, *cs_strides,
            out, out.stride(0), QK_PER=qk_per, HK=HK, HV=HV, DK=DK, DV=DV, BV=_next_pow2(DV),
            BQ=_next_pow2(qk_per), KW=kw, KWP=_next_pow2(kw), NORM_EPS=norm_eps, num_warps=FINISH_NUM_WARPS,
            SHIFT=not pre, **pdl,
        )  # fmt: skip
        return out
    y = causal_conv1d_update(qkv, conv_state, w, activation="silu")
    q, k, v = y.split([HK * DK, HK * DK, HV * DV], dim=-1)
    q, k, v = q.view(B, HK, DK), k.view(B, HK, DK), v.view(B, HV, DV)
    g, beta = gdn_gate(a, A_log, dt_bias), b.sigmoid()
    if resolved == "fla":
        o = gated_delta_rule_step(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=True, backend="fla")
    else:
        o = delta_rule_step_torch(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=True)
    zz = z.view(B, HV, DV) if z.dim() == 2 else z
    return (rms_norm(o.to(z.dtype), norm_weight, norm_eps) * F.silu(zz)).flatten(1)


def kda_decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    beta: Tensor,
    gate: Tensor,
    q_conv_state: Tensor,
    k_conv_state: Tensor,
    v_conv_state: Tensor,
    q_conv_weight: Tensor,
    k_conv_weight: Tensor,
    v_conv_weight: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    norm_weight: Tensor,
    state: Tensor,
    *,
    norm_eps: float,
    scale: float | None = None,
    backend: str = "auto",
    num_warps: int | None = None,
    block_v: int | None = None,
) -> Tensor:
    """One KDA decode token after the projections; the three conv states and the recurrent state updated IN PLACE.

    Args:
        q, k, v: ``[B, H*D]`` conv inputs (``{q,k,v}_proj`` outputs).
        f: ``[B, H*D]`` decay input ``f_b_proj(f_a_proj(x))``; ``g = -exp(A_log[h]) * softplus(f + dt_bias)``.
        beta: ``[B, H]`` beta logits (``beta_proj`` output; sigmoid applied here).
        gate: ``[B, H*D]`` output gate ``g_b_proj(g_a_proj(x))``.
        q_conv_state, k_conv_state, v_conv_state: ``[B, H*D, K-1]``, shifted in place (same strides for triton).
        q_conv_weight, k_conv_weight, v_conv_weight: ``[H*D, K]`` or ``[H*D, 1, K]`` (same strides for triton).
        A_log: ``[H]``; dt_bias: ``[H*D]``; norm_weight: ``[D]``.
        state: ``[B, H, D, D]`` fp32 (contiguous for ``"triton"``), updated in place.
        norm_eps: epsilon of the gated RMSNorm.
        scale: query scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"torch"``, ``"fla"``, ``"triton"``.
        num_warps: Triton launch width (default from the tile size); ignored by the other backends.
        block_v: value columns per program of the Triton state kernel (default :data:`BLOCK_V`, half below ``SMALL_BATCH`` rows).

    Returns:
        ``[B, H*D]`` in gate.dtype: ``rmsnorm(o) * norm_weight * silu(gate)`` per head, ready for ``o_proj``.
    """
    B, H, D, DV = state.shape
    if D != DV or q.shape[-1] != H * D:
        raise ValueError(f"KDA needs a square state [B, H, D, D] with q [B, H*D]; got {tuple(state.shape)}")
    scale = D**-0.5 if scale is None else scale
    ws = [_weight2d(w) for w in (q_conv_weight, k_conv_weight, v_conv_weight)]
    resolved = _resolve(backend, state, gate.dtype)
    if resolved == "triton":
        for name, t, width in (("q", q, H * D), ("k", k, H * D), ("v", v, H * D), ("f", f, H * D),
                               ("beta", beta, H), ("gate", gate, H * D)):  # fmt: skip
            _check_rows(name, t, B, width)
        _check_state(state, (B, H, D, D), True)
        css = (q_conv_state, k_conv_state, v_conv_state)
        if any(c.stride() != css[0].stride() or c.shape != css[0].shape for c in css) or any(
            w.stride() != ws[0].stride() or w.shape != ws[0].shape for w in ws
        ):
            raise ValueError(
                "the triton backend needs the three conv states (and weights) alike in shape and strides"
            )
        tk, pdl = _triton_module(), pdl_launch(state.device)
        o = torch.empty(B, H * D, dtype=gate.dtype, device=gate.device)
        out = torch.empty_like(o)
        bd, bv, kw = _next_pow2(D), _block_v(D, block_v, B), ws[0].shape[1]
        cs0, w0 = css[0], ws[0]
        cs_strides = (cs0.stride(0), cs0.stride(1), cs0.stride(2))
        pre = B >= PRECONV_MIN_ROWS
        xs = (q, k, v)
        if pre:
            if len({t.stride(0) for t in xs}) > 1:  # one launch takes one row stride
                xs = tuple(t.contiguous() for t in xs)
            xs = _conv_launch(tk, pdl, xs, css, tuple(ws))
        grid, vfirst = _state_grid(B, H, -(-D // bv))
        tk.kda_state_kernel[grid](
            xs[0], xs[0].stride(0), xs[1], xs[1].stride(0), xs[2], xs[2].stride(0), f, f.stride(0), beta,
            beta.stride(0), *css, *cs_strides, *ws, w0.stride(0), w0.stride(1), A_log, dt_bias, state, o,
            o.stride(0), scale, H=H, D=D, BD=bd, BV=bv, KW=kw, KWP=_next_pow2(kw), L2_EPS=L2NORM_EPS,
            **_launch_kw(bd, bv, num_warps), STREAM=STATE_STREAM_HINTS, PRECONV=pre,
            AHEAD=_lookahead(state, math.prod(grid)), EARLY=_early(B), VFIRST=vfirst, WIDE=STATE_WIDE_ADDRESSES,
            **pdl,
        )  # fmt: skip
        tk.kda_finish_kernel[(B, H)](
            o, o.stride(0), gate, gate.stride(0), norm_weight, q, q.stride(0), k, k.stride(0),
            q_conv_state, k_conv_state, *cs_strides, out, out.stride(0),
            D=D, BD=bd, KW=kw, KWP=_next_pow2(kw), NORM_EPS=norm_eps, num_warps=FINISH_NUM_WARPS, SHIFT=not pre,
            **pdl,
        )  # fmt: skip
        return out
    heads = (B, H, D)
    qc = causal_conv1d_update(q, q_conv_state, ws[0], activation="silu").view(heads)
    kc = causal_conv1d_update(k, k_conv_state, ws[1], activation="silu").view(heads)
    vc = causal_conv1d_update(v, v_conv_state, ws[2], activation="silu").view(heads)
    g = kda_gate(f, A_log, dt_bias, H)
    b = beta.sigmoid()
    if resolved == "fla":
        o = kda_step(qc, kc, vc, g, b, state, scale=scale, use_qk_l2norm=True, backend="fla")
    else:
        o = delta_rule_step_torch(qc, kc, vc, g, b, state, scale=scale, use_qk_l2norm=True)
    return (rms_norm(o.to(gate.dtype), norm_weight, norm_eps) * F.silu(gate.view(heads))).flatten(1)


def _conv_launch(tk: ModuleType, pdl: dict, xs: tuple[Tensor, ...], states: tuple[Tensor, ...],
                 weights: tuple[Tensor, ...]) -> Tensor:  # fmt: skip
    """``silu(conv)`` of each new input ``xs[t] [B, C]`` (one to three, alike in shape and strides, as their conv
    states ``[B, C, K-1]`` and weights ``[C, K]`` are) into ``y[t]`` of a fresh ``[T, B, C]`` in their dtype, the
    states shifted in place: one launch (``conv_update_kernel``), the state kernels' ``PRECONV`` input."""
    (B, C), T = xs[0].shape, len(xs)
    pad = lambda ts: (*ts, *(ts[0],) * (3 - T))  # noqa: E731 (unused slots: the kernel never reads them)
    y = torch.empty(T, B, C, dtype=xs[0].dtype, device=xs[0].device)
    cs, w = states[0], weights[0]
    tk.conv_update_kernel[(-(-B // CONV_ROWS), -(-C // CONV_BLOCK), T)](
        *pad(xs), xs[0].stride(0), *pad(states), cs.stride(0), cs.stride(1), cs.stride(2), *pad(weights),
        w.stride(0), w.stride(1), y, y.stride(0), y.stride(1), B, C, BR=CONV_ROWS, BC=CONV_BLOCK, KW=w.shape[1],
        num_warps=CONV_WARPS, **pdl,
    )  # fmt: skip
    return y


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()
