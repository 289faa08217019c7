"""Decode caches, one per placement, batch size and maximum length.

Every tensor is preallocated when the cache is built, so a one-token decode step only updates
buffers in place: shapes are static, positions live on the device (``Cache.pos``), and nothing in
a step reads a tensor value on the host. That is what lets a whole step be captured in a CUDA graph.

Per layer, the cache of the placement's mixer:

- :class:`AttentionCache` — keys (RoPE already applied) and values ``[B, S, Hkv, D]``. Full attention
  uses ``S = max_len`` and writes token ``p`` at slot ``p``; sliding-window attention uses a ring of
  ``S = min(W, max_len)`` slots and writes token ``p`` at slot ``p % S``. Either way, once token
  ``p`` is written, slot ``j`` holds a valid key exactly when ``j <= p`` (:meth:`AttentionCache.valid`).
- :class:`GDNCache` — conv state ``[B, 2*Hk*dk + Hv*dv, K-1]`` and fp32 recurrent state ``[B, Hv, dk, dv]``.
- :class:`KDACache` — three conv states ``[B, H*D, K-1]`` and fp32 recurrent state ``[B, H, D, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from placement_search import kernels as K
from placement_search.errors import PlacementSearchError
from placement_search.kernels.backend import resolve_decode_backend
from placement_search.spec import AttentionSpec, GDNSpec, KDASpec, MixerSpec


class CacheError(PlacementSearchError):
    """A cache used with the wrong placement, or past its maximum length."""


@dataclass
class AttentionCache:
    """Keys/values ``[B, S, Hkv, D]`` plus ``slots = arange(S)`` (a ring when ``ring`` is true)."""

    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor
    ring: bool

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def valid(self, pos: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, S]``: slots holding a key once token ``pos [B]`` has been written."""
        return self.slots[None, :] <= pos[:, None]

    def write_prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys/values ``[B, T, Hkv, D]`` of positions ``0..T-1`` (the last ``S`` for a ring)."""
        t = k.shape[1]
        first = max(0, t - self.size)
        idx = torch.arange(first, t, device=k.device) % self.size
        self.k[:, idx] = k[:, first:]
        self.v[:, idx] = v[:, first:]

    def slot(self, pos: torch.Tensor) -> torch.Tensor:
        """LongTensor ``[B]``: the slot of token ``pos [B]`` (``pos % S`` in a ring)."""
        return pos % self.size if self.ring else pos


@dataclass
class GDNCache:
    """Conv state ``[B, C, K-1]`` (C = 2*Hk*dk + Hv*dv) and fp32 recurrent state ``[B, Hv, dk, dv]``."""

    conv: torch.Tensor
    state: torch.Tensor


@dataclass
class KDACache:
    """Conv states ``[B, H*D, K-1]`` of q, k, v and fp32 recurrent state ``[B, H, D, D]``."""

    q_conv: torch.Tensor
    k_conv: torch.Tensor
    v_conv: torch.Tensor
    state: torch.Tensor


LayerCache = AttentionCache | GDNCache | KDACache


class AttentionStepInputs(NamedTuple):
    """What an attention layer's decode step reads from the :class:`StepContext` (:meth:`StepContext.attention`)."""

    cos: torch.Tensor
    sin_signed: torch.Tensor
    slot: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor
    bias: torch.Tensor
    lengths: torch.Tensor | None  # only where the decode backend is Triton


class StepContext:
    """What every layer of one decode step shares, derived from the positions ``pos [B]`` once per step.

    Built by :meth:`Supernet._step <placement_search.evaluators.supernet.Supernet._step>` and handed to each
    block, so the RoPE tables, ring slots and validity masks are computed once per step (per head size / cache
    size) instead of once per layer. Every value is memoised on first use; nothing reads a device value.
    """

    def __init__(self, pos: torch.Tensor) -> None:
        self.pos = pos
        self._rows: torch.Tensor | None = None
        self._rope: dict[tuple[int, float, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._slot: dict[tuple[int, bool], torch.Tensor] = {}
        self._valid: dict[int, torch.Tensor] = {}
        self._bias: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._lengths: dict[int, torch.Tensor] = {}

    @property
    def rows(self) -> torch.Tensor:
        """``arange(B)`` on the positions' device."""
        if self._rows is None:
            self._rows = torch.arange(self.pos.shape[0], device=self.pos.device)
        return self._rows

    def rope(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin_signed)`` ``[B, 1, 1, D]`` fp32 for :func:`~placement_search.kernels.apply_rope_tables`."""
        key = (head_dim, theta, dtype)
        if key not in self._rope:
            self._rope[key] = K.rope_step_tables(self.pos, head_dim, theta, dtype=dtype)
        return self._rope[key]

    def slot(self, cache: AttentionCache) -> torch.Tensor:
        """The write slot ``[B]`` of this step's token in ``cache``."""
        key = (cache.size, cache.ring)
        if key not in self._slot:
            self._slot[key] = cache.slot(self.pos)
        return self._slot[key]

    def valid(self, cache: AttentionCache) -> torch.Tensor:
        """Bool ``[B, S]`` (:meth:`AttentionCache.valid`), shared by all caches of size ``S``."""
        if cache.size not in self._valid:
            self._valid[cache.size] = cache.valid(self.pos)
        return self._valid[cache.size]

    def bias(self, cache: AttentionCache, dtype: torch.dtype) -> torch.Tensor:
        """The additive form ``[B, 1, 1, S]`` of :meth:`valid` (:func:`~placement_search.kernels.decode_bias`)."""
        key = (cache.size, dtype)
        if key not in self._bias:
            self._bias[key] = K.decode_bias(self.valid(cache), dtype)
        return self._bias[key]

    def attention(self, cache: AttentionCache, head_dim: int, theta: float, dtype: torch.dtype) -> AttentionStepInputs:
        """Everything an attention layer's decode step reads for ``cache``: RoPE tables, write slot, row indices,
        validity mask and its additive form, and the valid lengths where the decode backend is Triton (built once
        per step, memoised; the cost tables time exactly this as the step context)."""
        cos, sin_signed = self.rope(head_dim, theta, dtype)
        triton = resolve_decode_backend("auto", self.pos.device) == "triton"
        return AttentionStepInputs(cos, sin_signed, self.slot(cache), self.rows, self.valid(cache),
                                   self.bias(cache, dtype), self.lengths(cache) if triton else None)  # fmt: skip

    def lengths(self, cache: AttentionCache) -> torch.Tensor:
        """int32 ``[B]``: how many slots of ``cache`` are valid, the first ones (:meth:`valid` as a prefix;
        :func:`~placement_search.kernels.decode_lengths`)."""
        if cache.size not in self._lengths:
            self._lengths[cache.size] = K.decode_lengths(self.pos, cache.size)
        return self._lengths[cache.size]


def layer_cache(
    spec: MixerSpec, batch: int, max_len: int, *, device: torch.device | str, dtype: torch.dtype
) -> LayerCache:
    """An empty (zeroed) cache for one mixer of ``spec``."""
    z = torch.zeros
    state_dtype = torch.promote_types(dtype, torch.float32)  # fp32 (fp64 stays fp64 for exact tests)
    if isinstance(spec, AttentionSpec):
        size = max_len if spec.window_size is None else min(spec.window_size, max_len)
        shape = (batch, size, spec.head_groups, spec.head_size)
        return AttentionCache(
            k=z(shape, device=device, dtype=dtype),
            v=z(shape, device=device, dtype=dtype),
            slots=torch.arange(size, device=device),
            ring=spec.window_size is not None,
        )
    if isinstance(spec, GDNSpec):
        return GDNCache(
            conv=z(batch, spec.conv_dim, spec.conv_kernel_size - 1, device=device, dtype=dtype),
            state=z(
                batch,
                spec.value_heads,
                spec.key_head_dim,
                spec.value_head_dim,
                device=device,
                dtype=state_dtype,
            ),
        )
    if isinstance(spec, KDASpec):
        conv = (batch, spec.proj_dim, spec.conv_kernel_size - 1)
        return KDACache(
            q_conv=z(conv, device=device, dtype=dtype),
            k_conv=z(conv, device=device, dtype=dtype),
            v_conv=z(conv, device=device, dtype=dtype),
            state=z(batch, spec.heads, spec.head_dim, spec.head_dim, device=device, dtype=state_dtype),
        )
    raise TypeError(f"no cache for mixer spec {type(spec).__name__}")


class Cache:
    """Decode cache of one placement: per-layer caches plus the next position ``pos [B]`` (device, int64).

    ``length`` is the host-side count of tokens seen; it is advanced by the Python step wrapper
    (:meth:`Supernet.decode_step`), never read back from the device.
    """

    def __init__(
        self,
        placement: Sequence[str],
        specs: Sequence[MixerSpec],
        batch: int,
        max_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if batch < 1 or max_len < 1:
            raise CacheError(f"cache needs batch >= 1 and max_len >= 1, got batch={batch} max_len={max_len}")
        self.placement = tuple(placement)
        self.batch = batch
        self.max_len = max_len
        self.layers: list[LayerCache] = [
            layer_cache(s, batch, max_len, device=device, dtype=dtype) for s in specs
        ]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    def reset(self) -> None:
        """Forget every token (zero the states in place; buffers are kept, so captured graphs stay valid)."""
        for layer in self.layers:
            for t in vars(layer).values():
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.zero_()
        self.pos.zero_()
        self.length = 0

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        total = self.pos.nbytes
        for layer in self.layers:
            total += sum(t.nbytes for t in vars(layer).values() if isinstance(t, torch.Tensor))
        return total

    def check(self, placement: Sequence[str], batch: int, new_tokens: int) -> None:
        """Raise :class:`CacheError` unless ``new_tokens`` more tokens of ``batch`` rows fit this placement."""
        if tuple(placement) != self.placement:
            raise CacheError("cache was built for another placement; build a new one with Supernet.new_cache")
        if batch != self.batch:
            raise CacheError(f"cache holds batch {self.batch}, got {batch} rows")
        if self.length + new_tokens > self.max_len:
            raise CacheError(
                f"cache of max_len {self.max_len} holds {self.length} tokens; {new_tokens} more do not fit"
            )
