"""Rotary position embeddings, rotate-half convention (Mistral/Llama, ``mistral_1d`` in Apriel2)."""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from .backend import pdl_launch, triton_available


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


def rope_cache_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin_signed: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot: Tensor,
    rows: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """One decode token of an attention layer: RoPE on q and k, and the rotated k and v written into the caches.

    Args:
        q: ``[B, H, D]`` queries; k, v: ``[B, HKV, D]`` (row-strided views of a packed projection are fine; unit
            stride over D for ``"triton"``).
        cos, sin_signed: tables from :func:`rope_step_tables` (``[B, 1, 1, D]`` fp32).
        k_cache, v_cache: ``[B, S, HKV, D]``, written in place at ``[b, slot[b]]``.
        slot: LongTensor ``[B]``; rows: ``arange(B)`` (optional, precomputed by the caller).
        backend: ``"torch"`` (:func:`apply_rope_tables` and indexed copies); ``"triton"`` (one launch,
            :mod:`._rope_triton`; CPU tensors only under ``TRITON_INTERPRET=1``); ``"auto"``: Triton on CUDA for
            bf16/fp16, torch otherwise.

    Returns:
        The rotated queries ``[B, 1, H, D]`` in q.dtype (the layout :func:`.attention.attention_decode` takes).
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown rope backend {backend!r}; expected auto, torch or triton")
    B, H, D = q.shape
    use = backend == "triton" or (
        backend == "auto" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and triton_available()
    )
    if use and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("rope backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    if use and all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache)) and k_cache.stride() == v_cache.stride():
        kern = importlib.import_module(f"{__package__}._rope_triton").rope_cache_write_kernel
        cos2, sin2 = cos.reshape(B, D), sin_signed.reshape(B, D)
        out = torch.empty(B, 1, H, D, dtype=q.dtype, device=q.device)
        hkv = k.shape[1]
        kern[(B, H + hkv)](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
            cos2, sin2, cos2.stride(0), slot, out, out.stride(0), out.stride(2),
            k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            H, D=D, BD=1 << (D - 1).bit_length(), num_warps=1, **pdl_launch(q.device),
        )  # fmt: skip
        return out
    if backend == "triton":
        raise ValueError("rope backend 'triton' needs unit stride over D and caches of equal strides")
    q4, k4 = apply_rope_tables(q[:, None], cos, sin_signed), apply_rope_tables(k[:, None], cos, sin_signed)
    rows = torch.arange(B, device=q.device) if rows is None else rows
    k_cache[rows, slot] = k4[:, 0]
    v_cache[rows, slot] = v
    return q4
