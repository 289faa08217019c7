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


def rope_step_tables(
    positions: Tensor, head_dim: int, theta: float, *, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Tables for one decode step, built once and shared by every attention layer of that head size and theta.

    Args:
        positions: LongTensor ``[B]`` (one token per row).
        head_dim: D (even).
        theta: RoPE base.
        dtype: activation dtype: the tables are rounded to it, as :func:`rope_cos_sin` tables of that dtype are.

    Returns:
        ``(cos [B, 1, 1, D], sin_signed [B, 1, 1, D])`` in fp32, ``sin_signed = (-sin, +sin)`` over the two halves,
        for :func:`apply_rope_tables`.
    """
    cos, sin = rope_cos_sin(positions, head_dim, theta, dtype=dtype)
    half = head_dim // 2
    sin = sin.float()
    sin[..., :half].neg_()
    return cos.float()[:, None, None, :], sin[:, None, None, :]


def apply_rope_tables(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """:func:`apply_rope` with tables from :func:`rope_step_tables`, without the ``cat`` of :func:`rotate_half`.

    ``rotate_half(x) * sin == roll(x, D/2) * sin_signed`` (negation is exact), computed in fp32 (a bf16 ``x``
    times fp32 tables promotes) and cast back: the same values as :func:`apply_rope`.

    Args:
        x: ``[B, T, H, D]``.
        cos, sin_signed: ``[B, 1, 1, D]`` (or anything broadcasting to x) fp32.

    Returns:
        ``[B, T, H, D]`` in x.dtype.
    """
    rolled = x.roll(x.shape[-1] // 2, dims=-1)
    return (x * cos + rolled * sin_signed).to(x.dtype)
