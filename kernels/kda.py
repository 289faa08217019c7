"""Kimi delta attention (KDA): the gated delta rule with a per-key-channel (diagonal) decay.

Per head, with L2-normalised q, k and fp32 state ``S [DK, DV]``::

    S = diag(exp(g_t)) S;  delta = beta_t (v_t - S^T k_t);  S = S + k_t delta^T;  o_t = S^T (scale q_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import fla_module, resolve_linear_backend, resolve_step_backend
from .delta_rule import _default_scale, chunk_delta_rule, delta_rule_step_torch, fla_prefill, naive_delta_rule


def kda_gate(f: Tensor, A_log: Tensor, dt_bias: Tensor, heads: int) -> Tensor:
    """KDA per-channel log decay ``g = -exp(A_log[h]) * softplus(f + dt_bias)`` in fp32.

    Args:
        f: ``[..., H*DK]`` (``f_b_proj(f_a_proj(x))``).
        A_log: ``[H]``.
        dt_bias: ``[H*DK]``.
        heads: H.

    Returns:
        ``[..., H, DK]`` float32 (<= 0).
    """
    x = (f.float() + dt_bias.float()).unflatten(-1, (heads, -1))
    return -A_log.float().exp()[:, None] * F.softplus(x)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> None:
    if q.shape != k.shape or g.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and g {tuple(g.shape)} must match")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v {tuple(v.shape)} must share leading dims with k {tuple(k.shape)}")


def kda(
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
    """KDA over a sequence (prefill).

    Args:
        q, k: ``[B, T, H, DK]``.
        v: ``[B, T, H, DV]``.
        g: ``[B, T, H, DK]`` fp32 per-channel log decay (<= 0), e.g. from :func:`kda_gate`.
        beta: ``[B, T, H]`` in (0, 1).
        scale: query scale, default ``DK ** -0.5``.
        initial_state: ``[B, H, DK, DV]`` fp32 or None.
        output_final_state: return the final state.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6).
        backend: ``"naive"``, ``"chunk"`` (pure torch, chunk 64), ``"fla"`` (CUDA: ``chunk_kda``,
            ``fused_recurrent_kda`` when T == 1), ``"auto"``.

    Returns:
        ``(o [B, T, H, DV] in v.dtype, final_state [B, H, DK, DV] fp32 or None)``.
    """
    _check_shapes(q, k, v, g)
    scale = _default_scale(scale, k.shape[-1])
    resolved = resolve_linear_backend(backend, q.device)
    if resolved in ("fla", "fla_kda"):  # "fla_kda" (GDN through KDA's kernels) is plain "fla" for KDA
        return fla_prefill("kda", q, k, v, g, beta, scale=scale, initial_state=initial_state,
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


def kda_step(
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
    """One decode token of :func:`kda`; updates ``state`` IN PLACE. Graph-capturable.

    Args:
        q, k: ``[B, H, DK]``.
        v: ``[B, H, DV]``.
        g: ``[B, H, DK]`` fp32 log decay.
        beta: ``[B, H]``.
        state: ``[B, H, DK, DV]`` fp32 (contiguous for the fla path), overwritten.
        backend: ``"auto"``, ``"fla"`` (``fused_recurrent_kda_fwd`` with ``inplace_final_state=True``),
            ``"naive"``/``"chunk"`` (torch).

    Returns:
        ``o [B, H, DV]`` in v.dtype.
    """
    _check_shapes(q, k, v, g)
    scale = _default_scale(scale, k.shape[-1])
    if resolve_step_backend(backend, q.device) == "fla":
        fr = fla_module("kda.fused_recurrent")
        target = (
            state if state.is_contiguous() and state.dtype == torch.float32 else state.float().contiguous()
        )
        o, _ = fr.fused_recurrent_kda_fwd(
            q=q[:, None].contiguous(),
            k=k[:, None].contiguous(),
            v=v[:, None].contiguous(),
            g=g[:, None].float().contiguous(),
            beta=beta[:, None].contiguous(),
            scale=scale,
            initial_state=target,
            output_final_state=True,
            inplace_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
        )
        if target is not state:
            state.copy_(target)
        return o[:, 0]
    return delta_rule_step_torch(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm)
