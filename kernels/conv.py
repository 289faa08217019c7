"""Depthwise causal 1-D convolution (GDN / KDA short convolutions), prefill and one-step decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unsupported activation {activation!r} (expected 'silu' or None)")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    *,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv, no bias, left padding ``K-1`` taken from ``initial_state`` (zeros when None).

    ``y[b, t, c] = act(sum_i weight[c, i] * xpad[b, t + i, c])`` with ``xpad = cat(initial_state, x)`` along time.

    Args:
        x: ``[B, T, C]``.
        weight: ``[C, K]`` (the checkpoint's ``[C, 1, K]`` squeezed).
        initial_state: ``[B, C, K-1]`` (the previous K-1 inputs, oldest first) or None.
        activation: ``"silu"`` or None.

    Returns:
        ``(y [B, T, C] in x.dtype, final_state [B, C, K-1] in x.dtype)``; ``final_state`` holds the last K-1
        inputs (coming partly from ``initial_state`` when T < K-1), ready for :func:`causal_conv1d_update`.
        Accumulation is in fp32 (float64 inputs stay float64).
    """
    B, _, C = x.shape
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    Cw, K = weight.shape
    if Cw != C:
        raise ValueError(f"weight has {Cw} channels, x has {C}")
    cdt = torch.promote_types(x.dtype, torch.float32)
    xt = x.transpose(1, 2).to(cdt)  # [B, C, T]
    if initial_state is None:
        pad = xt.new_zeros(B, C, K - 1)
    else:
        if initial_state.shape != (B, C, K - 1):
            raise ValueError(f"initial_state must be {(B, C, K - 1)}, got {tuple(initial_state.shape)}")
        pad = initial_state.to(cdt)
    full = torch.cat((pad, xt), dim=-1)  # [B, C, T+K-1]
    y = F.conv1d(full, weight.to(cdt)[:, None, :], groups=C)  # [B, C, T]
    y = _activate(y, activation).transpose(1, 2).to(x.dtype).contiguous()
    final_state = full[:, :, full.shape[-1] - (K - 1) :].to(x.dtype).contiguous()
    return y, final_state


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    *,
    activation: str | None = "silu",
) -> Tensor:
    """One decode step of :func:`causal_conv1d`; updates ``conv_state`` IN PLACE (shift left, append ``x``).

    Static shapes, no host sync, no data-dependent branching: CUDA-graph capturable.

    Args:
        x: ``[B, C]`` the new input.
        conv_state: ``[B, C, K-1]`` previous K-1 inputs, oldest first; overwritten in place.
        weight: ``[C, K]``.
        activation: ``"silu"`` or None.

    Returns:
        ``y [B, C]`` in x.dtype (fp32 accumulation).
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    cdt = torch.promote_types(x.dtype, torch.float32)
    window = torch.cat((conv_state.to(cdt), x.to(cdt)[:, :, None]), dim=-1)  # [B, C, K]
    y = (window * weight.to(cdt)).sum(dim=-1)
    conv_state.copy_(window[:, :, 1:])
    return _activate(y, activation).to(x.dtype)
