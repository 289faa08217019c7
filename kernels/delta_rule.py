"""Gated delta rule (GDN): naive recurrence (reference), chunked WY/UT form in pure torch, and fla on CUDA.

Per value head h (key head ``h // (HV // HK)``), with L2-normalised q, k and fp32 state ``S [DK, DV]``::

    S = exp(g_t) * S
    delta = beta_t * (v_t - S^T k_t)
    S = S + k_t delta^T
    o_t = S^T (scale * q_t)

The shared torch cores here also serve KDA (:mod:`.kda`), whose decay is per key channel:
``S = diag(exp(g_t)) S`` with ``g_t [DK]``. A decay tensor with one more dimension than beta is per-channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import fla_module, resolve_linear_backend, resolve_step_backend

L2NORM_EPS = 1e-6
CHUNK_SIZE = 64


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over the last dim (fla's in-kernel convention), in x.dtype."""
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    use_qk_l2norm: bool,
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cast to the compute dtype, L2-normalise and scale, expand key heads to value heads.

    ``q, k [B, T, HK, DK]; v [B, T, HV, DV]; g [B, T, HV(, DK)]; beta [B, T, HV]`` -> same with HK -> HV.
    """
    HK, HV = k.shape[2], v.shape[2]
    if HV % HK:
        raise ValueError(f"value heads {HV} not a multiple of key heads {HK}")
    q, k, v, g, beta = (t.to(cdt) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    if HV != HK:
        q = q.repeat_interleave(HV // HK, dim=2)
        k = k.repeat_interleave(HV // HK, dim=2)
    return q, k, v, g, beta


def _decay(g_t: Tensor, beta_t: Tensor) -> Tensor:
    """exp(g) shaped to multiply a state ``[B, H, DK, DV]``: scalar ``[B, H]`` or per-channel ``[B, H, DK]``."""
    e = g_t.exp()
    return e[..., None, None] if g_t.dim() == beta_t.dim() else e[..., :, None]


def naive_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token recurrence (the reference). Shapes as :func:`gated_delta_rule` / :func:`.kda.kda`.

    Computes in fp32 (float64 if any input is float64); o in v.dtype, final state in the compute dtype.
    """
    cdt = _compute_dtype(q, k, v, initial_state)
    qx, kx, vx, gx, bx = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, cdt)
    B, T, H, DK = kx.shape
    DV = vx.shape[-1]
    S = vx.new_zeros(B, H, DK, DV) if initial_state is None else initial_state.to(cdt).clone()
    out = vx.new_empty(B, T, H, DV)
    for t in range(T):
        S = S * _decay(gx[:, t], bx[:, t])
        kv = torch.einsum("bhk,bhkv->bhv", kx[:, t], S)
        delta = bx[:, t, :, None] * (vx[:, t] - kv)
        S = S + kx[:, t, :, :, None] * delta[:, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", qx[:, t], S)
    return out.to(v.dtype), (S if output_final_state else None)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (WY / UT-transform) form in pure torch; agrees with :func:`naive_delta_rule` up to reassociation.

    Within a chunk, with ``G_i = cumsum(g)_i`` (scalar or per channel) and ``S0`` the state entering the chunk::

        (I + A) delta = beta*v - beta*(exp(G) k) S0,   A_ij = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)  (j < i)
        o_i   = (exp(G_i) q_i) S0 + sum_{j<=i} (sum_c q_ic k_jc exp(G_ic - G_jc)) delta_j
        S_end = exp(G_last) S0 + sum_j (k_j exp(G_last - G_j)) delta_j^T

    Every exponent is a difference ``G_i - G_j`` with ``j <= i`` (<= 0), so nothing overflows whatever the
    decay; the unit-lower-triangular system is solved with ``torch.linalg.solve_triangular``.
    Shapes as :func:`gated_delta_rule`; o in v.dtype, final state in the compute dtype (fp32 / float64).
    """
    cdt = _compute_dtype(q, k, v, initial_state)
    qx, kx, vx, gx, bx = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, cdt)
    per_channel = gx.dim() == bx.dim() + 1
    B, T, H, DK = kx.shape
    DV = vx.shape[-1]
    C = chunk_size
    n_chunks = (T + C - 1) // C
    pad = n_chunks * C - T
    # -> [B, H, T, ...]; zero padding at the end: beta = 0 and g = 0 leave the state untouched.
    qx, kx, vx = (F.pad(t.transpose(1, 2), (0, 0, 0, pad)) for t in (qx, kx, vx))
    bx = F.pad(bx.transpose(1, 2), (0, pad))
    gx = F.pad(gx.transpose(1, 2), (0, 0, 0, pad)) if per_channel else F.pad(gx.transpose(1, 2), (0, pad))

    S = vx.new_zeros(B, H, DK, DV) if initial_state is None else initial_state.to(cdt).clone()
    idx = torch.arange(C, device=vx.device)
    incl = idx[:, None] >= idx[None, :]  # j <= i
    strict = idx[:, None] > idx[None, :]  # j < i
    eye = torch.eye(C, dtype=cdt, device=vx.device)
    out = vx.new_empty(B, H, n_chunks * C, DV)
    for c in range(n_chunks):
        sl = slice(c * C, (c + 1) * C)
        qc, kc, vc, bc = qx[:, :, sl], kx[:, :, sl], vx[:, :, sl], bx[:, :, sl]
        Gc = gx[:, :, sl].cumsum(dim=2)  # [B, H, C] or [B, H, C, DK]
        if per_channel:
            diff = Gc[:, :, :, None, :] - Gc[:, :, None, :, :]  # [B, H, C, C, DK]
            dec = diff.masked_fill(~incl[:, :, None], float("-inf")).exp()
            kk = torch.einsum("bhic,bhjc,bhijc->bhij", kc, kc, dec)
            qk = torch.einsum("bhic,bhjc,bhijc->bhij", qc, kc, dec)
            eG = Gc.exp()  # [B, H, C, DK]
            to_end = (Gc[:, :, -1:, :] - Gc).exp()  # [B, H, C, DK]
            end = Gc[:, :, -1, :].exp()[..., None]  # [B, H, DK, 1]
        else:
            diff = Gc[:, :, :, None] - Gc[:, :, None, :]  # [B, H, C, C]
            dec = diff.masked_fill(~incl, float("-inf")).exp()
            kk = (kc @ kc.transpose(-1, -2)) * dec
            qk = (qc @ kc.transpose(-1, -2)) * dec
            eG = Gc.exp()[..., None]  # [B, H, C, 1]
            to_end = (Gc[:, :, -1:] - Gc).exp()[..., None]
            end = Gc[:, :, -1].exp()[..., None, None]  # [B, H, 1, 1]
        A = (bc[..., None] * kk).masked_fill(~strict, 0.0)
        rhs = torch.cat((bc[..., None] * vc, bc[..., None] * (kc * eG)), dim=-1)  # [B, H, C, DV + DK]
        sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
        u, w = sol[..., :DV], sol[..., DV:]
        delta = u - w @ S  # [B, H, C, DV]
        out[:, :, sl] = (qc * eG) @ S + qk @ delta
        S = end * S + (kc * to_end).transpose(-1, -2) @ delta
    o = out[:, :, :T].transpose(1, 2).to(v.dtype).contiguous()
    return o, (S if output_final_state else None)


def delta_rule_step_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool,
) -> Tensor:
    """One decode token in torch; updates ``state`` in place (graph-capturable: no host sync).

    ``q, k [B, HK, DK]; v [B, HV, DV]; g [B, HV] or [B, HV, DK]; beta [B, HV]; state [B, HV, DK, DV]``.
    """
    cdt = _compute_dtype(q, k, v, state)
    qx, kx, vx, gx, bx = _prepare(
        q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale, use_qk_l2norm, cdt
    )
    qx, kx, vx, gx, bx = qx[:, 0], kx[:, 0], vx[:, 0], gx[:, 0], bx[:, 0]
    S = state.to(cdt) * _decay(gx, bx)
    delta = bx[..., None] * (vx - torch.einsum("bhk,bhkv->bhv", kx, S))
    S = S + kx[..., :, None] * delta[..., None, :]
    state.copy_(S)
    return torch.einsum("bhk,bhkv->bhv", qx, S).to(v.dtype)


def gdn_gate(a: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tensor:
    """GDN log decay ``g = -exp(A_log) * softplus(a + dt_bias)`` in fp32.

    Args:
        a: ``[..., HV]`` (the ``a`` half of ``in_proj_ba``).
        A_log, dt_bias: ``[HV]``.

    Returns:
        ``[..., HV]`` float32 (<= 0).
    """
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


def _default_scale(scale: float | None, dk: int) -> float:
    return dk**-0.5 if scale is None else scale


def gdn_as_kda(q: Tensor, k: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gated delta rule's inputs in KDA's form: the same recurrence, with the scalar per-head decay applied to
    every key channel, and the key heads repeated to one per value head (GDN's grouping rule).

    ``q, k [B, T, HK, DK]``, ``g [B, T, HV]`` -> ``q, k [B, T, HV, DK]``, ``g [B, T, HV, DK]`` (>= fp32). KDA's state
    update ``S <- diag(exp(g_t)) S + ...`` with ``g_t`` equal in every channel is GDN's ``S <- exp(g_t) S + ...``;
    the gradients of the repeated and broadcast copies sum back onto the originals.
    """
    group = g.shape[2] // k.shape[2]
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    gx = g.to(torch.promote_types(g.dtype, torch.float32))
    return q, k, gx[..., None].expand(*g.shape, k.shape[-1])


def fla_prefill(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
) -> tuple[Tensor, Tensor | None]:
    """``fla.ops.<op>``'s ``chunk_<op>`` (``fused_recurrent_<op>`` when T == 1) with our conventions: contiguous
    inputs, an fp32 gate and initial state, the final state only when asked for (CUDA only).

    ``op="gated_delta_rule"``: q, k ``[B, T, HK, DK]``, g ``[B, T, HV]``; ``op="kda"``: q, k ``[B, T, H, DK]``,
    g ``[B, T, HV, DK]``. Both: v ``[B, T, HV, DV]``, beta ``[B, T, HV]``, initial state ``[B, HV, DK, DV]``.
    """
    mod = fla_module(op)
    init = None if initial_state is None else initial_state.float().contiguous()
    fn = getattr(mod, f"fused_recurrent_{op}" if q.shape[1] == 1 else f"chunk_{op}")
    o, final = fn(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g=g.float().contiguous(),
        beta=beta.contiguous(),
        scale=scale,
        initial_state=init,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
    )
    return o, (final if output_final_state else None)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule over a sequence (prefill).

    Args:
        q, k: ``[B, T, HK, DK]``.
        v: ``[B, T, HV, DV]``, ``HV % HK == 0``; value head h uses key head ``h // (HV // HK)``.
        g: ``[B, T, HV]`` fp32 log decay (<= 0), e.g. from :func:`gdn_gate`.
        beta: ``[B, T, HV]`` in (0, 1).
        scale: query scale, default ``DK ** -0.5``.
        initial_state: ``[B, HV, DK, DV]`` fp32 or None (zeros).
        output_final_state: return the final state.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) before use.
        backend: ``"naive"`` (recurrence), ``"chunk"`` (pure-torch chunked, chunk 64), ``"fla"`` (CUDA:
            ``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule`` when T == 1), ``"fla_kda"`` (CUDA:
            fla's KDA kernels on :func:`gdn_as_kda`'s inputs: one kernel family, autotuned once, for both linear
            mixers; fla's own gated backward refuses Triton < 3.7.1 on Hopper), ``"auto"``.

    Returns:
        ``(o [B, T, HV, DV] in v.dtype, final_state [B, HV, DK, DV] fp32 or None)``.
    """
    scale = _default_scale(scale, k.shape[-1])
    resolved = resolve_linear_backend(backend, q.device)
    if resolved == "fla_kda":
        qx, kx, gx = gdn_as_kda(q, k, g)
        return fla_prefill("kda", qx, kx, v, gx, beta, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)  # fmt: skip
    if resolved == "fla":
        return fla_prefill("gated_delta_rule", q, k, v, g, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)  # fmt: skip
    impl = naive_delta_rule if resolved == "naive" else chunk_delta_rule
    return impl(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
    )


def gated_delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    backend: str = "auto",
) -> Tensor:
    """One decode token of :func:`gated_delta_rule`; updates ``state`` IN PLACE. Graph-capturable.

    Args:
        q, k: ``[B, HK, DK]``.
        v: ``[B, HV, DV]``.
        g: ``[B, HV]`` fp32 log decay.
        beta: ``[B, HV]``.
        state: ``[B, HV, DK, DV]`` fp32, overwritten with the new state.
        backend: ``"auto"``, ``"fla"`` (fla's fused-recurrent kernel updating ``state`` in place: no new state,
            no copy back), ``"naive"``/``"chunk"`` (torch).

    Returns:
        ``o [B, HV, DV]`` in v.dtype.
    """
    scale = _default_scale(scale, k.shape[-1])
    if resolve_step_backend(backend, q.device) == "fla":
        return _fla_step_inplace(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return delta_rule_step_torch(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm)


def _fla_step_inplace(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool,
) -> Tensor:
    """fla's fused-recurrent GDN kernel with the state as both initial and final state (``h0 = ht = state``).

    Each program reads its ``[DK, BV]`` tile of the state and writes the same tile back, so passing one buffer
    for both is race-free; nothing is allocated for the final state and nothing is copied back (the public
    ``fused_recurrent_gated_delta_rule`` allocates a fresh fp32 state every call). Same kernel, same launch
    parameters as the public path: same results. Shapes as :func:`gated_delta_rule_step`.
    """
    import triton

    fr = fla_module("gated_delta_rule.fused_recurrent")
    target = state if state.is_contiguous() and state.dtype == torch.float32 else state.float().contiguous()
    B, HK, DK = k.shape
    HV, DV = v.shape[1], v.shape[2]
    q4, k4, v4 = q[:, None].contiguous(), k[:, None].contiguous(), v[:, None].contiguous()
    beta4 = beta[:, None].contiguous()
    o = torch.empty_like(v4)
    g4 = g[:, None].float().contiguous()
    bk, bv = triton.next_power_of_2(DK), min(8, triton.next_power_of_2(DV))
    try:
        fr.fused_recurrent_gated_delta_rule_fwd_kernel[(triton.cdiv(DV, bv) * B * HV,)](
            q=q4, k=k4, v=v4, g=g4, gk=None, gv=None, beta=beta4, A_log=None, dt_bias=None, o=o,
            h0=target, ht=target, cu_seqlens=None, scale=scale, T=1, H=HK, HV=HV, K=DK, V=DV, BK=bk, BV=bv,
            IS_BETA_HEADWISE=True, USE_QK_L2NORM_IN_KERNEL=use_qk_l2norm, APPLY_BETA_SIGMOID=False,
            ALLOW_NEG_EIGVAL=False, STATE_V_FIRST=False, num_warps=1, num_stages=3,
        )  # fmt: skip
    except TypeError:  # another fla version's kernel signature: the public call (fresh state, copied back)
        o, final = fla_module("gated_delta_rule").fused_recurrent_gated_delta_rule(
            q4, k4, v4, g=g4, beta=beta4, scale=scale, initial_state=target, output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
        )  # fmt: skip
        target.copy_(final)
    if target is not state:
        state.copy_(target)
    return o[:, 0]
