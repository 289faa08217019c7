"""Causal GQA attention (full and sliding-window) for prefill, and single-query decode over a static cache.

Conventions: ``[B, T, H, D]`` layout; query head ``h`` uses KV head ``h // (H // Hkv)``; with ``window=W`` query
``i`` sees keys ``j`` with ``i - W < j <= i`` (exactly ``min(W, i+1)`` keys, itself included).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import pdl_launch, resolve_attention_backend, resolve_decode_backend, sm_count

# Without gradients, a sliding window over at most this many tokens runs as SDPA with a dense boolean mask instead of
# FlexAttention: Flex is compiled once per shape (``dynamic=False``), and evaluation feeds many shapes (on the H200,
# 2026-11-28, a campaign hit torch.compile's recompile limit and fell back to Flex's unfused path); the dense
# [T, T] mask costs at most 1 MiB here, and long prefills (throughput at L >= 4K) keep Flex's block sparsity.
DENSE_WINDOW_MAX_T = 1024
# Queries per block in the CPU reference: bounds the [B, H, block, S] fp32 score tensor.
_REFERENCE_Q_BLOCK = 1024


def causal_window_mask(
    q_len: int,
    kv_len: int | None = None,
    window: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask ``[q_len, kv_len]``, True = attend.

    Queries are the LAST ``q_len`` positions of a ``kv_len`` sequence (lower-right aligned), so query row ``r`` is
    absolute position ``i = kv_len - q_len + r`` and sees keys ``j <= i`` (and ``j > i - window`` when windowed).
    """
    kv_len = q_len if kv_len is None else kv_len
    i = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return mask


def _check_gqa(q: Tensor, k: Tensor, v: Tensor) -> int:
    H, Hkv = q.shape[2], k.shape[2]
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if H % Hkv:
        raise ValueError(f"query heads {H} not a multiple of kv heads {Hkv}")
    return H // Hkv


def _reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Explicit masked softmax in fp32 (float64 inputs stay float64).

    q ``[B, Tq, H, D]``, k/v ``[B, S, Hkv, D]``, mask bool broadcastable to ``[B, H, Tq, S]`` -> ``[B, Tq, H, D]``.
    """
    G = _check_gqa(q, k, v)
    cdt = torch.promote_types(q.dtype, torch.float32)
    kx = k.to(cdt).repeat_interleave(G, dim=2)  # [B, S, H, D]
    vx = v.to(cdt).repeat_interleave(G, dim=2)
    q32 = q.to(cdt)
    Tq = q.shape[1]
    outs = []
    for s in range(0, Tq, _REFERENCE_Q_BLOCK):
        e = min(s + _REFERENCE_Q_BLOCK, Tq)
        scores = torch.einsum("bthd,bshd->bhts", q32[:, s:e], kx) * scale
        m = mask[..., s:e, :]
        scores = scores.masked_fill(~m, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("bhts,bshd->bthd", p, vx))
    return torch.cat(outs, dim=1).to(q.dtype)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, is_causal: bool, attn_mask: Tensor | None
) -> Tensor:
    """torch SDPA with GQA on ``[B, T, H, D]`` tensors, cuDNN preferred on CUDA."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kwargs: dict[str, Any] = {"scale": scale, "is_causal": is_causal, "attn_mask": attn_mask}
    enable_gqa = qh.shape[1] != kh.shape[1]
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
        try:
            ctx = sdpa_kernel(order, set_priority=True)
        except TypeError:  # older torch without set_priority
            ctx = sdpa_kernel(order)
        with ctx:
            out = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=enable_gqa, **kwargs)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=enable_gqa, **kwargs)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _flex_block_mask(q_len: int, kv_len: int, window: int | None, device: str) -> Any:
    """Cached FlexAttention BlockMask for lower-right-aligned causal (optionally windowed) attention."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len

    if window is None:

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx <= q_idx + offset

    else:

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            i = q_idx + offset
            return (kv_idx <= i) & (kv_idx > i - window)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


def _flex(q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None) -> Tensor:
    block_mask = _flex_block_mask(q.shape[1], k.shape[1], window, str(q.device))
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = _compiled_flex()(
        qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=qh.shape[1] != kh.shape[1]
    )
    return out.transpose(1, 2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    window: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal prefill attention with GQA, optionally sliding-window.

    Args:
        q: ``[B, T, H, D]`` (RoPE already applied).
        k, v: ``[B, T, Hkv, D]``; ``H % Hkv == 0``, query head h uses kv head ``h // (H // Hkv)``.
        scale: softmax scale (``head_size ** -0.5`` for Apriel2).
        window: W or None; query i sees keys ``i - W < j <= i``.
        backend: ``"auto"`` (CPU: reference; CUDA: SDPA for full causal, FlexAttention for a window, or SDPA with
            a dense mask for a window without gradients over ``T <= DENSE_WINDOW_MAX_T``),
            ``"reference"`` (explicit masked fp32 softmax), ``"sdpa"`` (full causal: ``is_causal``; window: dense
            bool mask, exact but slow), ``"flex"`` (CUDA FlexAttention with a cached block mask).

    Returns:
        ``[B, T, H, D]`` in q.dtype.
    """
    _check_gqa(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError("attention() is prefill from position 0: q and k need the same length")
    T = q.shape[1]
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window is not None and window >= T:
        window = None  # the window covers every causal key: plain causal attention
    resolved = resolve_attention_backend(backend, q.device, windowed=window is not None)
    if resolved == "flex" and backend == "auto" and T <= DENSE_WINDOW_MAX_T and not torch.is_grad_enabled():
        resolved = "sdpa"  # inference on short sequences: no per-shape compilation (see DENSE_WINDOW_MAX_T)
    if resolved == "reference":
        mask = causal_window_mask(T, T, window, device=q.device)
        return _reference_attention(q, k, v, mask, scale)
    if resolved == "sdpa":
        if window is None:
            return _sdpa(q, k, v, scale=scale, is_causal=True, attn_mask=None)
        mask = causal_window_mask(T, T, window, device=q.device)
        return _sdpa(q, k, v, scale=scale, is_causal=False, attn_mask=mask)
    return _flex(q, k, v, scale=scale, window=window)


def attention_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    valid: Tensor,
    *,
    scale: float,
    backend: str = "auto",
    bias: Tensor | None = None,
    lengths: Tensor | None = None,
) -> Tensor:
    """One query per sequence over a static-size KV cache.

    Slot order does not matter (RoPE is applied before caching), so this serves both the full cache
    (S = max length, ``valid[b, s] = s < len_b``) and the sliding-window ring buffer (S = W). No host sync and
    static shapes: CUDA-graph capturable. Every row needs at least one valid slot (the current token's slot is
    written before the call); a row with none gives NaN.

    Args:
        q: ``[B, 1, H, D]``.
        k_cache, v_cache: ``[B, S, Hkv, D]``.
        valid: BoolTensor ``[B, S]``, True = filled slot.
        scale: softmax scale.
        backend: ``"auto"`` (CUDA: ``"sdpa"``; CPU: ``"reference"``), ``"reference"`` (explicit fp32 softmax),
            ``"sdpa"`` (SDPA, ``enable_gqa``, boolean mask), ``"sdpa_grouped"`` (SDPA without ``enable_gqa``: the
            G query heads of a KV head as G query rows; exact as well, speed differs by size, see
            benchmarks/check_gpu_kernels.py), ``"triton"`` (split-K Triton kernel, :func:`triton_decode_splits`;
            not the default until measured on the GPU).
        bias: optional additive mask ``[B, 1, 1, S]`` in ``q.dtype``, 0 where ``valid`` and ``-inf`` elsewhere
            (:func:`decode_bias`); the SDPA backends take it as it is instead of converting the boolean mask at
            every call (one conversion per step instead of one per layer); the others use ``valid``.
        lengths: optional int32 ``[B]``, where ``valid`` is a prefix of each row: ``valid[b, s] == (s < lengths[b])``
            (the caller's promise, not checked: that would read device values); the ``"triton"`` backend then reads
            no slot past a row's length and no mask (:func:`decode_lengths`); the others use ``valid``.

    Returns:
        ``[B, 1, H, D]`` in q.dtype.
    """
    _check_gqa(q, k_cache, v_cache)
    if q.shape[1] != 1:
        raise ValueError(f"attention_decode takes one query per sequence, got q {tuple(q.shape)}")
    if lengths is not None and (lengths.shape != (q.shape[0],) or lengths.dtype != torch.int32):
        raise ValueError(f"lengths must be int32 [{q.shape[0]}], got {lengths.dtype} {tuple(lengths.shape)}")
    mask = valid[:, None, None, :].to(torch.bool)  # [B, 1, 1, S]
    resolved = resolve_decode_backend(backend, q.device)
    if bias is not None and resolved in ("sdpa", "sdpa_grouped"):
        mask = bias
    if resolved == "reference":
        return _reference_attention(q, k_cache, v_cache, mask, scale)
    if resolved == "sdpa_grouped":
        return _sdpa_decode_grouped(q, k_cache, v_cache, mask, scale=scale)
    if resolved == "triton":
        return _triton_decode(q, k_cache, v_cache, valid, scale=scale, lengths=lengths)
    return _sdpa(q, k_cache, v_cache, scale=scale, is_causal=False, attn_mask=mask)


def decode_bias(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive form ``[B, 1, 1, S]`` of a decode validity mask ``valid [B, S]``: 0 where True, ``-inf`` where
    False (what SDPA makes of a boolean mask: one ``where`` per call, which :func:`attention_decode`'s ``bias`` saves
    when all layers of a step share one)."""
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid[:, None, None, :], zero, torch.full((), float("-inf"), dtype=dtype, device=valid.device))


#: Keys per inner step of the Triton decode kernel; programs per SM the split count aims for; the fewest slots a
#: split gets (several pipelined steps each); K/V blocks in flight; splits per tile of the merge; warps per split
#: program.
TRITON_DECODE_BLOCK_S = 64
TRITON_DECODE_PROGRAMS_PER_SM = 2
TRITON_DECODE_MIN_SPLIT = 256
TRITON_DECODE_STAGES = 3
TRITON_DECODE_MERGE_CHUNK = 16
TRITON_DECODE_WARPS = 4


def triton_decode_splits(batch: int, kv_heads: int, slots: int, sms: int) -> tuple[int, int]:
    """``(splits, slots per split)`` of the Triton decode kernel: enough programs (``batch * kv_heads * splits``)
    for ``TRITON_DECODE_PROGRAMS_PER_SM`` per SM, each split at least ``TRITON_DECODE_MIN_SPLIT`` slots (where there
    are that many) and a whole number of ``TRITON_DECODE_BLOCK_S`` slots."""
    blk = TRITON_DECODE_BLOCK_S

    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    longest = cdiv(slots, max(blk, TRITON_DECODE_MIN_SPLIT))
    splits = max(1, min(longest, cdiv(TRITON_DECODE_PROGRAMS_PER_SM * sms, max(1, batch * kv_heads))))
    per = cdiv(cdiv(slots, splits), blk) * blk
    return cdiv(slots, per), per


def decode_lengths(pos: Tensor, slots: int) -> Tensor:
    """int32 ``[B]``: the valid slots of a decode cache of ``slots`` slots once token ``pos [B]`` is written, the
    first ``min(pos + 1, slots)`` (a full cache writes token ``p`` at slot ``p``, a ring at ``p % slots``); the
    ``lengths`` of :func:`attention_decode`."""
    return torch.clamp(pos + 1, max=slots).to(torch.int32)


def _triton_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, valid: Tensor, *, scale: float, lengths: Tensor | None = None
) -> Tensor:
    """Split-K Triton decode (:mod:`._attention_decode_triton`); shapes as :func:`attention_decode`."""
    from . import _attention_decode_triton as tri

    B, _, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    if D & (D - 1) or D < 16:
        raise ValueError(f"decode backend 'triton' needs a power-of-two head size >= 16, got {D}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode backend 'triton' needs the head dimension contiguous")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode backend 'triton' needs one dtype, got q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    sms = sm_count(q.device) if q.is_cuda else 8
    splits, per = triton_decode_splits(B, Hkv, S, sms)
    gq = 1 << max(G - 1, 0).bit_length()
    gp = max(16, gq)
    if lengths is not None:
        ok = lengths
    elif valid.dtype == torch.bool:
        ok = valid.contiguous().view(torch.uint8)
    else:
        ok = valid.ne(0).view(torch.uint8)
    rows = B * Hkv * splits * G
    m = torch.empty(rows, device=q.device, dtype=torch.float32)
    l_sum = torch.empty(rows, device=q.device, dtype=torch.float32)
    acc = torch.empty(rows, D, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    ieee = q.dtype == torch.float32 or not q.is_cuda  # fp32 dots (the interpreter's bf16 dot is broken)
    pdl = pdl_launch(q.device)
    tri._decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, ok, m, l_sum, acc, S, per,
        q.stride(0), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), ok.stride(0), float(scale),
        HKV=Hkv, NSPLIT=splits, G=G, GP=gp, D=D, BLOCK_S=TRITON_DECODE_BLOCK_S, IEEE=ieee,
        STAGES=TRITON_DECODE_STAGES, PREFIX=lengths is not None, num_warps=TRITON_DECODE_WARPS, **pdl,
    )  # fmt: skip
    ch = min(TRITON_DECODE_MERGE_CHUNK, 1 << max(splits - 1, 0).bit_length())
    tri._decode_merge_kernel[(B, Hkv)](m, l_sum, acc, out, out.stride(0), out.stride(2),
                                       HKV=Hkv, NSPLIT=splits, G=G, GQ=gq, D=D, CH=ch, **pdl)  # fmt: skip
    return out


def _sdpa_decode_grouped(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, *, scale: float
) -> Tensor:
    """Single-query GQA as grouped multi-query attention: the G = H // Hkv query heads of one KV head become G
    query rows of that head, so SDPA needs no ``enable_gqa`` (which rules out the memory-efficient kernel with a
    boolean mask) and no KV expansion.

    q ``[B, 1, H, D]``, caches ``[B, S, Hkv, D]``, mask ``[B, 1, 1, S]`` -> ``[B, 1, H, D]``.
    """
    B, _, H, D = q.shape
    Hkv = k_cache.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # query head h = kv * G + g
    out = F.scaled_dot_product_attention(
        qg, k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.reshape(B, 1, H, D)
