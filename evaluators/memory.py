"""GPU memory model of decoding a placement: caches, resident weights, workspace, largest batch.

Pure Python (no torch): usable by the cost model and the CLI on machines without a GPU.

What one decode *sequence* holds, per layer, for context length ``L`` (the cache holds ``L`` tokens; the
runtime allocates exactly these tensors, see ``evaluators/cache.py``):

- full attention: keys and values ``[L, Hkv, D]`` each, in the activation dtype;
- sliding-window attention: a ring of ``S = min(W, L)`` keys and values;
- GDN: conv state ``[2*Hk*dk + Hv*dv, K-1]`` (activation dtype) + recurrent state ``[Hv, dk, dv]`` (fp32);
- KDA: three conv states ``[H*D, K-1]`` (activation dtype) + recurrent state ``[H, D, D]`` (fp32);

plus the position counter (int64). Resident weights are either the placement's own mixers with the shared
part (a thin deployment) or the whole supernet. The workspace is what one decode step allocates besides the
caches (logits, activations, mixer temporaries, the CUDA graph pool) and a fixed reserve the tensors can never
use (CUDA context, library workspaces, allocator slack). :func:`max_batch` finds the largest batch whose total
fits a memory budget.

The workspace and reserve constants (:class:`RuntimeOverheads`) were sized from the allocator on an H200
(``benchmarks/measure_decode.py`` records the graph-pool size of every measured step and the memory the CUDA
context takes); the check there compares :func:`max_batch` with the batch where allocation actually fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from placement_search.errors import PlacementSearchError
from placement_search.spec import AttentionSpec, GDNSpec, KDASpec, MixerSpec, ModelSpec

GiB = 1024**3

#: Bytes per element of the dtypes a cache or weight can be stored in.
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

#: Resident-weight choices: the placement's mixers only (thin deployment), or every mixer (supernet).
RESIDENT = ("placement", "supernet")


class MemoryModelError(PlacementSearchError):
    """A memory question that cannot be answered (bad dtype, budget, or a placement that never fits)."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"``)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise MemoryModelError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class RuntimeOverheads:
    """Memory a decode step needs besides caches and weights.

    Attributes:
        reserve_bytes: never available to tensors: CUDA context, cuBLAS/cuDNN/Triton modules and handles,
            allocator rounding and fragmentation.
        fixed_workspace_bytes: per-step buffers independent of the batch (library workspaces, graph pool base).
        activation_elems_hidden: live activation elements per sequence in units of the hidden size
            (residual stream, norm outputs, projections).
        activation_elems_mlp: live MLP activation elements per sequence in units of the MLP width
            (gate, up, their product, silu).
        logits_copies: logits ``[B, V]`` tensors alive at the end of a step (the graph's static output).
        attention_temp_bytes_per_slot: per sequence and cache slot: the validity mask and what SDPA derives
            from it.
        gdn_state_copy: one extra ``[Hv, dk, dv]`` fp32 tensor per sequence held back for a GDN step. The step
            used to return a fresh state and copy it back; the fused kernels update it in place, and the reserve
            now covers what a step at a full cache needs beside it (logits, CUDA-graph pool): on the H200 the
            all-GDN step at 32K ran at 1124 sequences and not at 1147, the allocation limit; this model
            predicts 1119 (results/decode_measurements_h200_run6.json).
        conv_temp_factor: fp32 copies of the ``[C, K]`` conv window alive inside a GDN/KDA step.
    """

    reserve_bytes: int = 1 * GiB
    fixed_workspace_bytes: int = 256 * 1024**2
    activation_elems_hidden: int = 8
    activation_elems_mlp: int = 4
    logits_copies: int = 1
    attention_temp_bytes_per_slot: int = 4
    gdn_state_copy: bool = True
    conv_temp_factor: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "memory") -> RuntimeOverheads:
        """Inverse of :meth:`to_dict`; unknown keys and wrong types are errors naming the key."""
        if not isinstance(data, dict):
            raise MemoryModelError(f"{source}: expected an object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MemoryModelError(f"{source}: unknown key {unknown[0]!r}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(cls, key)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise MemoryModelError(f"{source}.{key}: expected true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MemoryModelError(f"{source}.{key}: expected a non-negative integer, got {value!r}")
            kwargs[key] = value
        return cls(**kwargs)


DEFAULT_OVERHEADS = RuntimeOverheads()


# --------------------------------------------------------------------------------------------
# Per-layer, per-sequence cache bytes


def mixer_cache_bytes(
    spec: MixerSpec, context: int, *, dtype: str = "bfloat16", state_dtype: str = "float32"
) -> int:
    """Cache bytes of one sequence in one layer of mixer ``spec`` holding ``context`` tokens."""
    if context < 1:
        raise MemoryModelError(f"context must be >= 1, got {context}")
    act = dtype_bytes(dtype)
    st = dtype_bytes(state_dtype)
    if isinstance(spec, AttentionSpec):
        slots = context if spec.window_size is None else min(spec.window_size, context)
        return 2 * slots * spec.head_groups * spec.head_size * act
    if isinstance(spec, GDNSpec):
        conv = spec.conv_dim * (spec.conv_kernel_size - 1) * act
        return conv + spec.value_heads * spec.key_head_dim * spec.value_head_dim * st
    if isinstance(spec, KDASpec):
        conv = 3 * spec.proj_dim * (spec.conv_kernel_size - 1) * act
        return conv + spec.heads * spec.head_dim * spec.head_dim * st
    raise MemoryModelError(f"no cache model for mixer spec {type(spec).__name__}")


def mixer_cache_fixed_bytes(spec: MixerSpec, context: int) -> int:
    """Batch-independent cache bytes of one layer (the attention slot index, int64)."""
    if isinstance(spec, AttentionSpec):
        slots = context if spec.window_size is None else min(spec.window_size, context)
        return 8 * slots
    return 0


def _names(spec: ModelSpec, placement: Sequence[str]) -> tuple[str, ...]:
    names = tuple(getattr(placement, "mixers", placement))
    if len(names) != spec.num_layers:
        raise MemoryModelError(f"placement has {len(names)} layers, {spec.name} has {spec.num_layers}")
    for i, name in enumerate(names):
        spec.mixer(i, name)  # raises ConfigError naming the layer
    return names


def cache_bytes_per_sequence(
    spec: ModelSpec, placement: Sequence[str], context: int, *, dtype: str = "bfloat16"
) -> int:
    """Decode-cache bytes of one sequence of ``placement`` at ``context`` (all layers plus the position)."""
    names = _names(spec, placement)
    return 8 + sum(mixer_cache_bytes(spec.mixer(i, n), context, dtype=dtype) for i, n in enumerate(names))


def cache_fixed_bytes(spec: ModelSpec, placement: Sequence[str], context: int) -> int:
    """Batch-independent cache bytes of ``placement`` (slot indices)."""
    names = _names(spec, placement)
    return sum(mixer_cache_fixed_bytes(spec.mixer(i, n), context) for i, n in enumerate(names))


# --------------------------------------------------------------------------------------------
# Weights and workspace


def weight_bytes(
    spec: ModelSpec,
    placement: Sequence[str] | None = None,
    *,
    resident: str = "placement",
    dtype: str = "bfloat16",
) -> int:
    """Resident weight bytes: the placement's mixers plus the shared part, or the whole supernet."""
    if resident not in RESIDENT:
        raise MemoryModelError(f"resident must be one of {', '.join(RESIDENT)}, got {resident!r}")
    if resident == "supernet":
        return spec.supernet_params() * dtype_bytes(dtype)
    if placement is None:
        raise MemoryModelError("resident='placement' needs a placement")
    return spec.placement_params(_names(spec, placement)) * dtype_bytes(dtype)


def _mixer_temp_bytes(spec: MixerSpec, context: int, overheads: RuntimeOverheads, act: int) -> int:
    if isinstance(spec, AttentionSpec):
        slots = context if spec.window_size is None else min(spec.window_size, context)
        return slots * overheads.attention_temp_bytes_per_slot
    if isinstance(spec, GDNSpec):
        state = spec.value_heads * spec.key_head_dim * spec.value_head_dim * 4 if overheads.gdn_state_copy else 0
        return state + overheads.conv_temp_factor * spec.conv_dim * spec.conv_kernel_size * 4
    if isinstance(spec, KDASpec):
        return overheads.conv_temp_factor * 3 * spec.proj_dim * spec.conv_kernel_size * 4 + 4 * spec.proj_dim * 4
    raise MemoryModelError(f"no workspace model for mixer spec {type(spec).__name__}")


def workspace_bytes_per_sequence(
    spec: ModelSpec,
    placement: Sequence[str],
    context: int,
    *,
    dtype: str = "bfloat16",
    overheads: RuntimeOverheads = DEFAULT_OVERHEADS,
) -> int:
    """Step workspace per sequence: logits, live activations, and the largest mixer temporary."""
    names = _names(spec, placement)
    act = dtype_bytes(dtype)
    mlp = max(layer.mlp.intermediate_size for layer in spec.layers)
    base = overheads.logits_copies * spec.vocab_size * act
    base += (overheads.activation_elems_hidden * spec.hidden_size + overheads.activation_elems_mlp * mlp) * act
    temps = {_mixer_temp_bytes(spec.mixer(i, n), context, overheads, act) for i, n in enumerate(names)}
    return base + max(temps)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of one decode configuration (``total`` is what must fit the budget)."""

    batch: int
    context: int
    weights: int
    cache: int
    workspace: int
    reserve: int
    cache_per_sequence: int
    resident: str = "placement"
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.weights + self.cache + self.workspace + self.reserve)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def gib(self) -> dict[str, float]:
        """The byte counts in GiB, rounded to 3 decimals."""
        keys = ("weights", "cache", "workspace", "reserve", "total", "cache_per_sequence")
        return {k: round(getattr(self, k) / GiB, 3) for k in keys}


def memory_breakdown(
    spec: ModelSpec,
    placement: Sequence[str],
    context: int,
    batch: int,
    *,
    resident: str = "placement",
    dtype: str = "bfloat16",
    overheads: RuntimeOverheads = DEFAULT_OVERHEADS,
) -> MemoryBreakdown:
    """Weights, caches, workspace and reserve of decoding ``batch`` sequences of ``placement`` at ``context``."""
    if batch < 0:
        raise MemoryModelError(f"batch must be >= 0, got {batch}")
    per_seq = cache_bytes_per_sequence(spec, placement, context, dtype=dtype)
    cache = batch * per_seq + cache_fixed_bytes(spec, placement, context)
    ws = overheads.fixed_workspace_bytes + batch * workspace_bytes_per_sequence(
        spec, placement, context, dtype=dtype, overheads=overheads
    )
    return MemoryBreakdown(
        batch=batch,
        context=context,
        weights=weight_bytes(spec, placement, resident=resident, dtype=dtype),
        cache=cache,
        workspace=ws,
        reserve=overheads.reserve_bytes,
        cache_per_sequence=per_seq,
        resident=resident,
    )


def max_batch(
    spec: ModelSpec,
    placement: Sequence[str],
    context: int,
    budget_bytes: int | float,
    *,
    resident: str = "placement",
    dtype: str = "bfloat16",
    overheads: RuntimeOverheads = DEFAULT_OVERHEADS,
    limit: int = 1 << 24,
) -> int:
    """Largest batch whose :func:`memory_breakdown` total fits ``budget_bytes`` (0 when not even one fits).

    The total is linear in the batch today, so the answer is solved from the totals at batches 0 and 1 and then
    checked (it fits, one more does not): 4 breakdowns instead of ~30 (a max-fit search asks this for thousands
    of mixer counts). Should the check fail (a non-linear term), an exponential then binary search over the
    monotone total decides.
    """
    if not budget_bytes > 0:
        raise MemoryModelError(f"memory budget must be positive, got {budget_bytes}")

    def total(b: int) -> int:
        return memory_breakdown(spec, placement, context, b, resident=resident, dtype=dtype, overheads=overheads).total

    def fits(b: int) -> bool:
        return total(b) <= budget_bytes

    t0, t1 = total(0), total(1)
    if t1 > budget_bytes:
        return 0
    if t1 > t0:
        guess = int(min(limit, (budget_bytes - t0) // (t1 - t0)))
        if guess >= 1 and fits(guess) and (guess == limit or not fits(guess + 1)):
            return guess
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def batch_upper_bound(
    spec: ModelSpec,
    mixer: str,
    context: int,
    budget_bytes: int | float,
    *,
    dtype: str = "bfloat16",
    overheads: RuntimeOverheads = DEFAULT_OVERHEADS,
) -> int:
    """An upper bound on the max-fit batch of ANY placement that uses ``mixer`` at least once.

    Weights at least the shared part plus the lightest mixer in every layer; cache at least one layer of
    ``mixer`` plus the smallest cache in every other layer; no workspace. Cost tables are measured up to this
    batch so that every placement's max-fit batch under ``budget_bytes`` lies inside the grid.
    """
    act = dtype_bytes(dtype)
    d = spec.hidden_size
    weights = spec.shared_params() * act
    caches: list[int] = []
    has_mixer = False
    for layer in spec.layers:
        weights += min(m.num_params(d) for m in layer.mixers.values()) * act
        caches.append(min(mixer_cache_bytes(m, context, dtype=dtype) for m in layer.mixers.values()))
        if mixer in layer.mixers:
            has_mixer = True
    if not has_mixer:
        raise MemoryModelError(f"{spec.name} has no mixer {mixer!r}")
    extra = max(
        mixer_cache_bytes(layer.mixers[mixer], context, dtype=dtype) - c
        for layer, c in zip(spec.layers, caches, strict=True)
        if mixer in layer.mixers
    )
    per_seq = 8 + sum(caches) + extra
    free = budget_bytes - weights - overheads.reserve_bytes
    return max(0, int(free // per_seq))


# --------------------------------------------------------------------------------------------
# Bytes a decode step must move (for bandwidth efficiency)


def decode_step_bytes(
    spec: ModelSpec, placement: Sequence[str], context: int, batch: int, *, dtype: str = "bfloat16"
) -> dict[str, int]:
    """The fewest bytes one decode step of ``batch`` sequences must move through device memory.

    Weights are read once (the embedding table only for the ``batch`` looked-up rows); each cache is read
    once and written where it changes (attention: all ``S`` slots read, one written; GDN/KDA: conv and
    recurrent states read and written); logits are written once. Activations are ignored (kilobytes).
    """
    names = _names(spec, placement)
    act = dtype_bytes(dtype)
    d = spec.hidden_size
    embed_table = spec.vocab_size * d * act
    weights = spec.placement_params(names) * act - embed_table + batch * d * act
    cache = 0
    for i, name in enumerate(names):
        m = spec.mixer(i, name)
        per = mixer_cache_bytes(m, context, dtype=dtype)
        if isinstance(m, AttentionSpec):
            cache += per + 2 * m.head_groups * m.head_size * act  # read every slot, write one
        else:
            cache += 2 * per  # states read and written
    logits = spec.vocab_size * act
    return {
        "weights": weights,
        "cache": batch * cache,
        "logits": batch * logits,
        "total": weights + batch * (cache + logits),
    }
