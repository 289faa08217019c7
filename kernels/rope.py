"""Rotary position embeddings, rotate-half convention (Mistral/Llama, ``mistral_1d`` in Apriel2)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(
    positions: Tensor,
    head_dim: int,
    theta: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """cos/sin tables for absolute positions.

    Args:
        positions: LongTensor ``[T]`` or ``[B, T]`` of absolute token indices.
        head_dim: D (even).
        theta: RoPE base.
        dtype: dtype of the returned tables (the angles are always computed in fp32).
        device: device of the tables (default: ``positions.device``).

    Returns:
        ``(cos, sin)``, each ``[T, D]`` or ``[B, T, D]``; frequency ``i`` (``i < D/2``) is
        ``theta ** (-2i / D)`` and both halves of the last dimension repeat the same angles.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    device = positions.device if device is None else torch.device(device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = positions.to(device=device, dtype=torch.float32)[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [..., D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """``[..., D] -> [..., D]``: ``(x1, x2) -> (-x2, x1)`` with x1/x2 the first/second half."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` by the angles of ``cos``/``sin``.

    Args:
        x: ``[B, T, H, D]``.
        cos, sin: ``[T, D]`` (shared by the batch) or ``[B, T, D]``.

    Returns:
        ``[B, T, H, D]`` in ``x.dtype``: ``x * cos + rotate_half(x) * sin``, computed in fp32 and cast back.
    """
    if cos.dim() == 2:
        cos_b, sin_b = cos[None, :, None, :], sin[None, :, None, :]
    elif cos.dim() == 3:
        cos_b, sin_b = cos[:, :, None, :], sin[:, :, None, :]
    else:
        raise ValueError(f"cos/sin must be [T, D] or [B, T, D], got {tuple(cos.shape)}")
    x32 = x.float()
    out = x32 * cos_b.float() + rotate_half(x32) * sin_b.float()
    return out.to(x.dtype)
