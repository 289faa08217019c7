"""Mixer modules whose parameter names equal the Apriel2 checkpoint tensor names.

Each mixer has two entry points:

- ``forward(x [B, T, d], positions [T], cache=None) -> [B, T, d]``: a whole sequence starting at position 0;
  when ``cache`` is given it is filled for decoding.
- ``step(x [B, 1, d], pos [B], cache, ctx=None, residual=None, norm=None, next_norm=None) -> [B, 1, d]``: one
  token at position ``pos``, updating ``cache`` in place with static shapes and no host synchronisation; with
  ``residual`` the result is ``residual + mixer(x)``; with ``norm`` (the block's input :class:`RMSNorm`) the mixer
  reads ``norm(x)``; with ``next_norm`` the result is :class:`~placement_search.kernels.NormedRows` for that norm.
  ``x`` and ``residual`` may be ``NormedRows`` too (the previous projection's): on the Triton path the norm between
  two projections then costs no launch (:data:`placement_search.kernels.projection.FUSE_NORM`). ``ctx``
  (:class:`~.cache.StepContext`) carries what all layers of a step share (RoPE tables, slots, masks); without it
  the layer builds its own.

GDN and KDA decode through :func:`~placement_search.kernels.gdn_decode_step` /
:func:`~placement_search.kernels.kda_decode_step`: two fused Triton launches between the projections on CUDA
(three from ``kernels.fused_decode.PRECONV_MIN_ROWS`` rows; ``decode_backend = "auto"``), the torch composition of
the same ops on CPU. Set a module's ``decode_backend`` to ``"torch"``, ``"fla"`` or ``"triton"`` to force a path.

Decode projections go through :mod:`placement_search.kernels.projection` (the skinny Triton kernel on CUDA for a few
rows, cuBLAS/CPU otherwise). On that path a mixer's input projections are packed into one ``[sum N, d]`` weight on
the first step (:func:`packed_weight`; the parameters become row views of it, so nothing is copied twice and loading
into them still works) and read in one launch, and the output projection adds the block's residual in its epilogue
(``step(..., residual=x)`` returns ``x + mixer(h)``).

The math lives in :mod:`placement_search.kernels`; here are only projections, reshapes and cache plumbing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from placement_search import kernels as K
from placement_search.evaluators.cache import AttentionCache, GDNCache, KDACache, StepContext
from placement_search.spec import AttentionSpec, GDNSpec, KDASpec, MixerSpec

INIT_STD = 0.02
#: Whether a KDA decode step on the Triton path runs its two low-rank gate up-projections (``f_b_proj``,
#: ``g_b_proj``, ``[H*D, D]`` each) as one launch (``K.linear_pair``) instead of two cuBLAS calls. False: two
#: calls (to compare: ``benchmarks/ab_decode_step.py`` variant ``+gates2``).
PAIRED_GATE_PROJECTIONS = True
#: Whether an attention layer's decode step on the Triton path runs RoPE and the KV-cache write in its q/k/v
#: projection's epilogue (``K.linear_rope_cache``: one launch) instead of a launch of their own after it
#: (``K.rope_cache_write``). False: two launches (to compare: ``benchmarks/ab_decode_step.py`` variant ``+urope``).
#: On the H200 (whole 32K step, ``K.projection.ROPE_CONFIG``'s tiles) the fused launch takes 0.9% off all-SWA at
#: batch 1 and 16, 0.8% / 0.3% off all-attention, 0.3% / 0.2% off mixed; results/decode_step_ab_ropetiles*_h200.json.
FUSED_ROPE_PROJECTION = True
#: A GDN/KDA decode step's input projection asks L2 for the layer's recurrent state as its programs finish (the
#: projection's ``l2_prefetch``) when the state holds at most this many MiB (0: never), so that the state kernel
#: reads it from L2 (to compare: ``benchmarks/ab_decode_step.py`` knob ``+sp<N>``). 4: batches 1 and 2 (2 MiB a
#: row at 15B sizes). On the H200, whole 32K step, three runs on three machines: batch 1 all-GDN -0.17% (each run),
#: all-KDA -0.17 / -0.19 / -0.28%, mixed -0.08..-0.11%, logits bit-equal; at batch 16 (32 MiB) +0.5% (all-GDN) and
#: +1.5% (all-KDA) slower: the projection's tail grows by what the state kernel saves and more
#: (results/decode_step_ab_sp_h200.json, decode_step_ab_sa_h200.json, decode_step_ab_es_h200.json).
STATE_L2_PREFETCH_MIB = 4
#: Where the state holds more than :data:`STATE_L2_PREFETCH_MIB`, the input projection asks L2 for its first this
#: many MiB instead (0: none; knob ``+spp<N>``): with the state kernels' grid in memory order
#: (``K.fused_decode.STATE_GRID_MEMORY_ORDER_MIN_ROWS``) those are the tiles of their first wave. Off: on the H200
#: (whole 32K step, that grid) 8, 12 or 16 MiB of the 32 MiB at 16 rows were 0.0-0.4% slower, within 0.02% at 64
#: (results/decode_step_ab_spp_h200.json).
STATE_L2_PREFETCH_PART_MIB = 0
#: Otherwise a decode step's input projection asks L2 for the first this many MiB of the mixer's output-projection
#: weight (0: none), to stream while the mixer's own kernels leave HBM idle (knob ``+wp<N>``; not on attention's
#: fused q/k/v + RoPE launch, ``FUSED_ROPE_PROJECTION``, which came after it). Off: on the H200
#: (whole 32K step, five placements, batch 1 and 16) 16 MiB came within -0.04% / +0.38%, 24 MiB +0.1..+1.5%, the
#: whole 40 MiB +0.3..+1.1% (results/decode_step_ab_wp_h200.json).
OUTPUT_WEIGHT_L2_PREFETCH_MIB = 0


def _l2_prefetch(out_weight: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor | None:
    """What a decode step's input projection asks L2 for (``K.linear``'s ``l2_prefetch``): the recurrent ``state``
    when it holds at most :data:`STATE_L2_PREFETCH_MIB`, else its first :data:`STATE_L2_PREFETCH_PART_MIB`, else
    the first :data:`OUTPUT_WEIGHT_L2_PREFETCH_MIB` of the output projection's weight, else nothing."""
    if state is not None and state.numel() * state.element_size() <= STATE_L2_PREFETCH_MIB * 2**20:
        return state
    if state is not None and STATE_L2_PREFETCH_PART_MIB and state.is_contiguous():
        return state.view(-1)[: STATE_L2_PREFETCH_PART_MIB * 2**20 // state.element_size()]
    n = OUTPUT_WEIGHT_L2_PREFETCH_MIB * 2**20 // out_weight.element_size()
    return out_weight.view(-1)[: min(n, out_weight.numel())] if n and out_weight.is_contiguous() else None


class RMSNorm(nn.Module):
    """``rms_norm(x) * weight`` over the last dimension (fp32 statistics, cast back before the weight)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.weight.fill_(1.0)


def packed_weight(
    owner: nn.Module,
    linears: tuple[nn.Linear, ...],
    x: torch.Tensor,
    *,
    key: str = "_decode_pack",
    min_weight: int | None = None,
) -> torch.Tensor | None:
    """The weights of ``linears`` stacked into one ``[sum N, K]`` tensor, when the decode step's Triton projection
    takes ``x`` (CUDA, a few rows, no gradient, no biases) and they hold at least ``min_weight`` elements (default
    ``K.SKINNY_MIN_WEIGHT``); None otherwise.

    Packed on first use: the stacked tensor is allocated, filled, and each parameter's ``data`` becomes its row
    view, so memory is not doubled. It is kept on ``owner`` under ``key`` (not as a parameter or buffer: the state
    dict keeps the checkpoint's names) and packed again if a parameter was replaced since (a checkpoint load that
    assigns).
    """
    weights = [lin.weight for lin in linears]
    if any(lin.bias is not None for lin in linears) or not K.linear_uses_triton(x, weights):
        return None
    if sum(w.numel() for w in weights) < (K.SKINNY_MIN_WEIGHT if min_weight is None else min_weight):
        return None
    packed = owner.__dict__.get(key)
    if packed is not None and packed.shape[0] == sum(w.shape[0] for w in weights):
        row, ok = 0, True
        for w in weights:
            ok = ok and w.data_ptr() == packed[row].data_ptr() and w.shape[1] == packed.shape[1]
            row += w.shape[0]
        if ok:
            return packed
    # a normal tensor even when the step runs under inference_mode: the parameters stay trainable afterwards
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.cat([w.detach() for w in weights])
        row = 0
        for w in weights:
            w.data = packed[row : row + w.shape[0]]
            row += w.shape[0]
    owner.__dict__[key] = packed
    return packed


#: A decode step's residual stream: the rows, or the rows with what the next RMSNorm needs (``K.NormedRows``).
Rows = torch.Tensor | K.NormedRows


def _project(
    owner: nn.Module,
    linears: tuple[nn.Linear, ...],
    x: Rows,
    norm: RMSNorm | None = None,
    prefetch: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``[lin(x) for lin in linears]`` (of ``norm(x)`` when given) for ``x [B, d]``: one launch over the packed
    weight on the Triton path, the norm applied there (the results are column views of its output), ``prefetch``
    asked of L2 by it (``K.linear``'s ``l2_prefetch``); the norm, then one projection each, otherwise."""
    packed = packed_weight(owner, linears, K.plain_rows(x))
    if packed is None:
        x = K.plain_rows(x) if norm is None else norm(K.plain_rows(x))
        return [K.linear(x, lin.weight, lin.bias) for lin in linears]
    nw, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    y = K.linear(x, packed, norm_weight=nw, norm_eps=eps, l2_prefetch=prefetch)
    return list(y.split([lin.weight.shape[0] for lin in linears], dim=-1))


def _out_proj(lin: nn.Linear, o: torch.Tensor, residual: Rows | None, next_norm: RMSNorm | None = None) -> Rows:
    """``lin(o)`` as ``[B, 1, d]`` for ``o [B, n]``, plus ``residual [B, 1, d]`` when given (fused on the Triton path);
    ``K.NormedRows`` for ``next_norm`` when given (written in the same launch on the Triton path)."""
    res = None if residual is None else residual[:, 0]
    nw = None if next_norm is None else next_norm.weight
    return K.linear(o, lin.weight, lin.bias, residual=res, next_norm_weight=nw)[:, None]


def _conv(channels: int, kernel: int) -> nn.Conv1d:
    """Depthwise conv holder; its weight is ``[C, 1, K]`` as in the checkpoint (no bias)."""
    return nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)


@torch.no_grad()
def init_linear_and_conv(module: nn.Module, generator: torch.Generator | None) -> None:
    """Normal(0, 0.02) for linear weights, U(±1/sqrt(K)) for depthwise convs, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, INIT_STD, generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Conv1d):
            bound = 1.0 / math.sqrt(m.kernel_size[0])
            m.weight.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def _init_decay(A_log: torch.Tensor, dt_bias: torch.Tensor, generator: torch.Generator | None) -> None:
    """``A ~ U(1, 16)``, ``dt ~ logU(1e-3, 0.1)`` stored as ``dt_bias = softplus^-1(dt)`` (Mamba-style)."""
    A_log.copy_(torch.empty_like(A_log, dtype=torch.float32).uniform_(1.0, 16.0, generator=generator).log())
    u = torch.empty_like(dt_bias, dtype=torch.float32).uniform_(0.0, 1.0, generator=generator)
    dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal GQA attention with RoPE; sliding-window when ``spec.window_size`` is set.

    Parameters: ``q_proj [H*D, d]``, ``k_proj``/``v_proj [Hkv*D, d]``, ``o_proj [d, H*D]`` (+ biases when
    ``add_linear_biases``).
    """

    def __init__(self, hidden_size: int, spec: AttentionSpec) -> None:
        super().__init__()
        self.spec = spec
        h, hkv, dh, bias = spec.heads, spec.head_groups, spec.head_size, spec.add_linear_biases
        self.q_proj = nn.Linear(hidden_size, h * dh, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hkv * dh, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hkv * dh, bias=bias)
        self.o_proj = nn.Linear(h * dh, hidden_size, bias=bias)
        self.scale = dh**-0.5

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_linear_and_conv(self, generator)

    def _qkv(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, H, D]``, k and v ``[B, T, Hkv, D]``, RoPE applied to q and k at ``positions``."""
        b, t, _ = x.shape
        s = self.spec
        q = self.q_proj(x).view(b, t, s.heads, s.head_size)
        k = self.k_proj(x).view(b, t, s.head_groups, s.head_size)
        v = self.v_proj(x).view(b, t, s.head_groups, s.head_size)
        cos, sin = K.rope_cos_sin(positions, s.head_size, s.rope_theta, dtype=x.dtype, device=x.device)
        return K.apply_rope(q, cos, sin), K.apply_rope(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: AttentionCache | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._qkv(x, positions)
        o = K.attention(q, k, v, scale=self.scale, window=self.spec.window_size)
        if cache is not None:
            cache.write_prefill(k, v)
        return self.o_proj(o.reshape(b, t, -1))

    def step(
        self,
        x: Rows,
        pos: torch.Tensor,
        cache: AttentionCache,
        ctx: StepContext | None = None,
        residual: Rows | None = None,
        norm: RMSNorm | None = None,
        next_norm: RMSNorm | None = None,
    ) -> Rows:
        b, dtype = K.plain_rows(x).shape[0], K.plain_rows(x).dtype
        s = self.spec
        ctx = StepContext(pos) if ctx is None else ctx
        a = ctx.attention(cache, s.head_size, s.rope_theta, dtype)
        inputs = (self.q_proj, self.k_proj, self.v_proj)
        packed = packed_weight(self, inputs, K.plain_rows(x)[:, 0]) if FUSED_ROPE_PROJECTION else None
        if packed is not None and K.rope_fits(packed, s.heads, s.head_groups, cache.k, cache.v):
            nw, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
            q = K.linear_rope_cache(
                x[:, 0], packed, s.heads, s.head_groups, a.cos, a.sin_signed, a.slot, cache.k, cache.v,
                norm_weight=nw, norm_eps=eps,
            )  # fmt: skip
        else:
            q, k, v = _project(self, inputs, x[:, 0], norm, _l2_prefetch(self.o_proj.weight))
            q = K.rope_cache_write(
                q.view(b, s.heads, s.head_size), k.view(b, s.head_groups, s.head_size),
                v.view(b, s.head_groups, s.head_size), a.cos, a.sin_signed, cache.k, cache.v, a.slot, a.rows,
            )  # fmt: skip
        o = K.attention_decode(q, cache.k, cache.v, a.valid, scale=self.scale, bias=a.bias, lengths=a.lengths)
        return _out_proj(self.o_proj, o.reshape(b, -1), residual, next_norm)


class GDN(nn.Module):
    """Gated DeltaNet.

    Parameters: ``in_proj_qkvz [2*Hk*dk + 2*Hv*dv, d]`` (flat ``[Q | K | V | Z]``), ``in_proj_ba [2*Hv, d]``
    (``[b | a]``), ``convolution [2*Hk*dk + Hv*dv, 1, K]`` over ``cat(Q, K, V)``, ``A_log [Hv]``,
    ``dt_bias [Hv]``, ``norm [dv]``, ``out_proj [d, Hv*dv]``.
    """

    def __init__(self, hidden_size: int, spec: GDNSpec) -> None:
        super().__init__()
        self.spec = spec
        s = spec
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * s.key_dim + 2 * s.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * s.value_heads, bias=False)
        self.convolution = _conv(s.conv_dim, s.conv_kernel_size)
        self.A_log = nn.Parameter(torch.empty(s.value_heads))
        self.dt_bias = nn.Parameter(torch.empty(s.value_heads))
        self.norm = RMSNorm(s.value_head_dim, s.norm_eps)
        self.out_proj = nn.Linear(s.value_dim, hidden_size, bias=False)
        self.decode_backend = "auto"

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_linear_and_conv(self, generator)
        _init_decay(self.A_log, self.dt_bias, generator)
        self.norm.reset_parameters()

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``qkv [B, T, C]`` (conv input), ``z [B, T, Hv, dv]``, ``g [B, T, Hv]`` fp32, ``beta [B, T, Hv]``."""
        s = self.spec
        b, t, _ = x.shape
        qkv, z = self.in_proj_qkvz(x).split([2 * s.key_dim + s.value_dim, s.value_dim], dim=-1)
        beta, a = self.in_proj_ba(x).split([s.value_heads, s.value_heads], dim=-1)
        g = K.gdn_gate(a, self.A_log, self.dt_bias)
        return qkv, z.view(b, t, s.value_heads, s.value_head_dim), g, beta.sigmoid()

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the conv output ``[B, T, C]`` into q, k ``[B, T, Hk, dk]`` and v ``[B, T, Hv, dv]``."""
        s = self.spec
        b, t, _ = qkv.shape
        q, k, v = qkv.split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
        return (
            q.reshape(b, t, s.key_heads, s.key_head_dim),
            k.reshape(b, t, s.key_heads, s.key_head_dim),
            v.reshape(b, t, s.value_heads, s.value_head_dim),
        )

    def _out(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``out_proj(rmsnorm_over_dv(o) * norm.weight * silu(z))``; o, z ``[B, T, Hv, dv]``."""
        o = self.norm(o.to(z.dtype)) * F.silu(z)
        return self.out_proj(o.flatten(2))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: GDNCache | None = None
    ) -> torch.Tensor:
        qkv, z, g, beta = self._project(x)
        qkv, conv_state = K.causal_conv1d(
            qkv, self.convolution.weight[:, 0], activation="silu", output_final_state=cache is not None
        )
        q, k, v = self._heads(qkv)
        o, state = K.gated_delta_rule(
            q, k, v, g, beta, output_final_state=cache is not None, use_qk_l2norm=True
        )
        if cache is not None:
            cache.conv.copy_(conv_state)
            cache.state.copy_(state)
        return self._out(o, z)

    def step(
        self,
        x: Rows,
        pos: torch.Tensor,
        cache: GDNCache,
        ctx: StepContext | None = None,
        residual: Rows | None = None,
        norm: RMSNorm | None = None,
        next_norm: RMSNorm | None = None,
    ) -> Rows:
        s = self.spec
        prefetch = _l2_prefetch(self.out_proj.weight, cache.state)
        qkvz, ba = _project(self, (self.in_proj_qkvz, self.in_proj_ba), x[:, 0], norm, prefetch)
        qkv, z = qkvz.split([2 * s.key_dim + s.value_dim, s.value_dim], dim=-1)
        b, a = ba.split([s.value_heads, s.value_heads], dim=-1)
        o = K.gdn_decode_step(
            qkv, z, b, a, cache.conv, self.convolution.weight, self.A_log, self.dt_bias, self.norm.weight,
            cache.state, norm_eps=self.norm.eps, backend=self.decode_backend,
        )  # fmt: skip
        return _out_proj(self.out_proj, o, residual, next_norm)


class KDA(nn.Module):
    """Kimi Delta Attention.

    Parameters: ``{q,k,v}_proj [H*D, d]``, ``{q,k,v}_conv [H*D, 1, K]``, ``f_a_proj [D, d]``, ``f_b_proj [H*D, D]``,
    ``g_a_proj [D, d]``, ``g_b_proj [H*D, D]``, ``beta_proj [H, d]``, ``o_proj [d, H*D]``, ``A_log [H]``,
    ``dt_bias [H*D]``, ``norm [D]``.
    """

    def __init__(self, hidden_size: int, spec: KDASpec) -> None:
        super().__init__()
        self.spec = spec
        h, dh, p, kern = spec.heads, spec.head_dim, spec.proj_dim, spec.conv_kernel_size
        self.q_proj = nn.Linear(hidden_size, p, bias=False)
        self.k_proj = nn.Linear(hidden_size, p, bias=False)
        self.v_proj = nn.Linear(hidden_size, p, bias=False)
        self.q_conv = _conv(p, kern)
        self.k_conv = _conv(p, kern)
        self.v_conv = _conv(p, kern)
        self.f_a_proj = nn.Linear(hidden_size, dh, bias=False)
        self.f_b_proj = nn.Linear(dh, p, bias=False)
        self.g_a_proj = nn.Linear(hidden_size, dh, bias=False)
        self.g_b_proj = nn.Linear(dh, p, bias=False)
        self.beta_proj = nn.Linear(hidden_size, h, bias=False)
        self.o_proj = nn.Linear(p, hidden_size, bias=False)
        self.A_log = nn.Parameter(torch.empty(h))
        self.dt_bias = nn.Parameter(torch.empty(p))
        self.norm = RMSNorm(dh, spec.norm_eps)
        self.decode_backend = "auto"

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_linear_and_conv(self, generator)
        _init_decay(self.A_log, self.dt_bias, generator)
        self.norm.reset_parameters()

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decay ``g [B, T, H, D]`` fp32, ``beta [B, T, H]`` and output gate ``[B, T, H, D]``."""
        s = self.spec
        b, t, _ = x.shape
        g = K.kda_gate(self.f_b_proj(self.f_a_proj(x)), self.A_log, self.dt_bias, s.heads)
        gate = self.g_b_proj(self.g_a_proj(x)).view(b, t, s.heads, s.head_dim)
        return g, self.beta_proj(x).sigmoid(), gate

    def _out(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``o_proj(rmsnorm_over_D(o) * norm.weight * silu(gate))``; o, gate ``[B, T, H, D]``."""
        o = self.norm(o.to(gate.dtype)) * F.silu(gate)
        return self.o_proj(o.flatten(2))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KDACache | None = None
    ) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        keep = cache is not None
        q, q_state = K.causal_conv1d(self.q_proj(x), self.q_conv.weight[:, 0], output_final_state=keep)
        k, k_state = K.causal_conv1d(self.k_proj(x), self.k_conv.weight[:, 0], output_final_state=keep)
        v, v_state = K.causal_conv1d(self.v_proj(x), self.v_conv.weight[:, 0], output_final_state=keep)
        g, beta, gate = self._gates(x)
        heads = (b, t, s.heads, s.head_dim)
        o, state = K.kda(
            q.view(heads), k.view(heads), v.view(heads), g, beta,
            output_final_state=cache is not None, use_qk_l2norm=True,
        )  # fmt: skip
        if cache is not None:
            cache.q_conv.copy_(q_state)
            cache.k_conv.copy_(k_state)
            cache.v_conv.copy_(v_state)
            cache.state.copy_(state)
        return self._out(o, gate)

    def _gate_up(self, fa: torch.Tensor, ga: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``f_b_proj(fa)`` and ``g_b_proj(ga)`` of a decode step: one launch on the Triton path
        (``K.linear_pair`` over the two weights packed, when ``PAIRED_GATE_PROJECTIONS``), two projections
        otherwise."""
        pair = (self.f_b_proj, self.g_b_proj)
        packed = packed_weight(self, pair, fa, key="_decode_pack_gates", min_weight=0) if PAIRED_GATE_PROJECTIONS else None
        if packed is None:
            return K.linear(fa, self.f_b_proj.weight), K.linear(ga, self.g_b_proj.weight)
        n1 = self.f_b_proj.weight.shape[0]
        y = K.linear_pair(fa, ga, packed, n1)
        return y[:, :n1], y[:, n1:]

    def step(
        self,
        x: Rows,
        pos: torch.Tensor,
        cache: KDACache,
        ctx: StepContext | None = None,
        residual: Rows | None = None,
        norm: RMSNorm | None = None,
        next_norm: RMSNorm | None = None,
    ) -> Rows:
        inputs = (self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.g_a_proj, self.beta_proj)
        prefetch = _l2_prefetch(self.o_proj.weight, cache.state)
        q, k, v, fa, ga, beta = _project(self, inputs, x[:, 0], norm, prefetch)
        f, gate = self._gate_up(fa, ga)
        o = K.kda_decode_step(
            q, k, v, f, beta, gate,
            cache.q_conv, cache.k_conv, cache.v_conv, self.q_conv.weight, self.k_conv.weight, self.v_conv.weight,
            self.A_log, self.dt_bias, self.norm.weight, cache.state,
            norm_eps=self.norm.eps, backend=self.decode_backend,
        )  # fmt: skip
        return _out_proj(self.o_proj, o, residual, next_norm)


Mixer = Attention | GDN | KDA


def build_mixer(hidden_size: int, spec: MixerSpec) -> Mixer:
    """The module for ``spec`` (uninitialised parameters; call ``reset_parameters``)."""
    if isinstance(spec, AttentionSpec):
        return Attention(hidden_size, spec)
    if isinstance(spec, GDNSpec):
        return GDN(hidden_size, spec)
    if isinstance(spec, KDASpec):
        return KDA(hidden_size, spec)
    raise TypeError(f"unsupported mixer spec {type(spec).__name__}")
