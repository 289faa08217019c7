"""Measured decode (and prefill) throughput of placements on a GPU.

Decode: the whole-model step (embedding, every block with its mixer, shared MLP and norms, final norm, LM
head) of :meth:`Supernet.decode_step` is captured in ONE CUDA graph (warm-up on a side stream, static token,
cache and output buffers) and replayed; the step time is the median of the replays timed with CUDA events,
and tokens/s is ``B / step``. The cache is filled as if ``L`` tokens had been seen: random contents, every
position at ``L - 1`` so that the step writes slot ``L - 1`` and attends to ``L`` keys (a full sliding-window
ring), and each replay first resets the positions so that every replay does exactly the same work.

Pieces (for the cost tables, :mod:`.cost_model`): ``k`` distinct decoder blocks with their own weights and
caches in one graph (``layer``), the same without their mixers (``shared``), and the part outside the blocks
(``head``). One large cache allocation serves every ``(k, batch)`` of a mixer and context as row views. For the
attention mixers also the step-wide work their layers share (``step_context``: RoPE tables, write slots, validity
mask, built once per step), which a ``layer`` piece of ``k`` blocks holds ``1/k`` of.

On a CPU (``--device cpu`` smoke tests) the same code runs eagerly and is timed with the host clock.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import torch

from placement_search import kernels as K
from placement_search.evaluators.cache import AttentionCache, Cache, StepContext, layer_cache
from placement_search.evaluators.memory import GiB, RuntimeOverheads, memory_breakdown
from placement_search.evaluators.supernet import Supernet, mixers_for
from placement_search.placement import Placement
from placement_search.spec import AttentionSpec, ModelSpec

# --------------------------------------------------------------------------------------------
# Environment


def device_info(device: torch.device) -> dict[str, Any]:
    """Machine, GPU and library versions for provenance."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "dtype": "bfloat16",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "unknown")
    except Exception:
        info["fla"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(
            gpu=props.name,
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
            device_memory_bytes=total,
            device_memory_gib=round(total / GiB, 3),
            free_at_start_bytes=free,
        )
    else:
        info.update(gpu=f"CPU ({platform.processor() or platform.machine()})", cuda=None)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop dead tensors and return cached blocks to the driver (between measurements)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """An allocation failure (torch's OOM error, or a RuntimeError saying so)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "cudaerrormemoryallocation" in text)


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Replay times of one captured step, in ms."""

    times_ms: list[float]
    graph_pool_bytes: int = 0

    @property
    def ms(self) -> float:
        return median(self.times_ms)

    @property
    def p10(self) -> float:
        s = sorted(self.times_ms)
        return s[int(0.1 * (len(s) - 1))]

    @property
    def p90(self) -> float:
        s = sorted(self.times_ms)
        return s[round(0.9 * (len(s) - 1))]


class CapturedStep:
    """``fn`` captured in a CUDA graph after warm-up on a side stream (eager on CPU).

    ``fn`` must only touch static buffers (in-place updates); its return value is the graph's static output.
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, warmup: int = 2) -> None:
        self.fn = fn
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool_bytes = 0
        with torch.no_grad():
            if device.type != "cuda":
                for _ in range(max(1, warmup)):
                    self.out = fn()
                return
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            # The warm-up's temporaries sit cached in the general pool; the graph gets a private pool, so
            # hand them back first (a served step holds only the graph's pool).
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn()
            torch.cuda.synchronize(device)
            self.pool_bytes = torch.cuda.memory_reserved(device) - before

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.out = self.fn()

    def time(self, replays: int = 20, warmup: int = 2, budget_s: float | None = 0.5) -> Timing:
        """Median-able replay times; ``replays`` is lowered (not below 5) to keep within ``budget_s``."""
        for _ in range(warmup):
            self.replay()
        synchronize(self.device)
        if self.graph is None:
            times = []
            for _ in range(replays):
                t0 = time.perf_counter()
                self.replay()
                times.append((time.perf_counter() - t0) * 1e3)
            return Timing(times)
        t0 = time.perf_counter()
        self.replay()
        torch.cuda.synchronize(self.device)
        first = time.perf_counter() - t0
        if budget_s is not None and first > 0:
            replays = max(5, min(replays, int(budget_s / first)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            self.graph.replay()
            e.record()
        torch.cuda.synchronize(self.device)
        return Timing([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)], self.pool_bytes)

    def close(self) -> None:
        self.graph = None
        self.out = None


# --------------------------------------------------------------------------------------------
# Caches filled "as if L tokens were seen"


def fill_random_(tensors: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> None:
    """Random contents for cache tensors (keys/values ~N(0,1), fp32 states ~N(0, 0.02^2)); never zeros."""
    for t in tensors:
        if not t.is_floating_point():
            continue
        std = 0.02 if t.dtype == torch.float32 else 1.0
        t.normal_(0.0, std, generator=generator)


def layer_tensors(layer: Any) -> list[torch.Tensor]:
    return [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]


def prepare_cache(cache: Cache, context: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``cache`` randomly and set it to hold ``context - 1`` tokens; returns the static start positions."""
    for layer in cache.layers:
        fill_random_(layer_tensors(layer), generator)
    cache.pos.fill_(context - 1)
    cache.length = context - 1
    return cache.pos.clone()


def row_view(big: Any, start: int, stop: int) -> Any:
    """The rows ``start:stop`` of a per-layer cache (batch-dimension fields sliced, others shared)."""
    values = {}
    for f in dataclasses.fields(big):
        v = getattr(big, f.name)
        if isinstance(v, torch.Tensor) and f.name != "slots":
            v = v[start:stop]
        values[f.name] = v
    return type(big)(**values)


# --------------------------------------------------------------------------------------------
# Whole-model decode


@dataclass
class DecodeMeasurement:
    """One measured decode configuration."""

    placement: str
    context: int
    batch: int
    step_ms: float
    p10_ms: float
    p90_ms: float
    replays: int
    cache_bytes: int
    graph_pool_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_ms * 1e3

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out["tokens_per_s"] = self.tokens_per_s
        out.update(self.extra)
        return out


def logits_finite(logits: torch.Tensor, rows: int = 8) -> bool | None:
    """Whether the first ``rows`` rows of the logits are finite (small: steps run at the memory limit)."""
    try:
        return bool(torch.isfinite(logits[:rows]).all())
    except Exception as e:
        if is_oom(e):
            return None
        raise


def decode_step_fn(model: Supernet, cache: Cache, token: torch.Tensor, pos0: torch.Tensor, context: int):
    """The captured step: reset positions to ``pos0`` then one :meth:`Supernet.decode_step`."""

    def step() -> torch.Tensor:
        cache.pos.copy_(pos0)
        cache.length = context - 1  # host-side counter only; the graph never reads it
        return model.decode_step(token, cache)

    return step


def measure_decode(
    model: Supernet,
    placement: Any,
    context: int,
    batch: int,
    *,
    replays: int = 20,
    seed: int = 0,
    budget_s: float | None = 0.5,
) -> DecodeMeasurement:
    """Whole-model decode step of ``placement`` at ``context`` and ``batch`` in one CUDA graph."""
    device = model.device
    names = model.set_placement(placement)
    code = Placement(names, model.spec.search_space).code()
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(batch, context)
    captured = None
    try:
        pos0 = prepare_cache(cache, context, gen)
        token = torch.randint(0, model.spec.vocab_size, (batch,), device=device, generator=gen)
        captured = CapturedStep(decode_step_fn(model, cache, token, pos0, context), device)
        timing = captured.time(replays, budget_s=budget_s)
        finite = logits_finite(captured.out)
        return DecodeMeasurement(
            placement=code,
            context=context,
            batch=batch,
            step_ms=timing.ms,
            p10_ms=timing.p10,
            p90_ms=timing.p90,
            replays=len(timing.times_ms),
            cache_bytes=cache.nbytes(),
            graph_pool_bytes=captured.pool_bytes,
            extra={"finite": finite},
        )
    finally:
        if captured is not None:
            captured.close()
        del cache, captured
        free_memory(device)


def decode_fits(model: Supernet, placement: Any, context: int, batch: int) -> bool:
    """Whether a cache of ``batch`` plus a captured decode step (graph pool) and one replay allocate."""
    device = model.device
    model.set_placement(placement)
    cache = captured = None
    try:
        cache = model.new_cache(batch, context)
        pos0 = prepare_cache(cache, context)
        token = torch.zeros(batch, dtype=torch.long, device=device)
        captured = CapturedStep(decode_step_fn(model, cache, token, pos0, context), device, warmup=1)
        captured.replay()
        synchronize(device)
        return True
    except Exception as e:  # only allocation failures mean "does not fit"
        if not is_oom(e):
            raise
        return False
    finally:
        if captured is not None:
            captured.close()
        del cache, captured
        free_memory(device)


def largest_batch(
    model: Supernet, placement: Any, context: int, guess: int, *, max_probes: int = 12
) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch for which :func:`decode_fits` holds, searched around ``guess``; and the probes."""
    probes: list[tuple[int, bool]] = []

    def fits(b: int) -> bool:
        ok = decode_fits(model, placement, context, b)
        probes.append((b, ok))
        return ok

    guess = max(1, guess)
    if fits(guess):
        lo, hi = guess, None
        step = max(1, guess // 16)
        while hi is None and len(probes) < max_probes:
            b = lo + step
            if fits(b):
                lo, step = b, step * 2
            else:
                hi = b
    else:
        hi, lo = guess, None
        step = max(1, guess // 16)
        while lo is None and len(probes) < max_probes:
            b = max(1, hi - step)
            if fits(b):
                lo = b
            elif b == 1:
                return 0, probes
            else:
                hi, step = b, step * 2
    if lo is None:
        return 0, probes
    while hi is not None and hi - lo > 1 and len(probes) < max_probes + 8:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def runtime_reserve_bytes(device: torch.device) -> int:
    """Device memory in use that torch's allocator does not hold (CUDA context, library modules)."""
    if device.type != "cuda":
        return 0
    free_memory(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


# --------------------------------------------------------------------------------------------
# Prefill


def measure_prefill(
    model: Supernet, placement: Any, context: int, batch: int = 1, *, reps: int = 2, seed: int = 0
) -> dict[str, Any]:
    """Prefill of ``batch`` prompts of ``context`` tokens into a fresh cache (logits of the last token only).

    One pass through the blocks (the runtime's mixers prefill from position 0 in one call; they have no
    chunked continuation), timed with CUDA events after one warm-up (which also compiles/autotunes).
    """
    device = model.device
    names = model.set_placement(placement)
    code = Placement(names, model.spec.search_space).code()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.spec.vocab_size, (batch, context), device=device, generator=gen)
    positions = torch.arange(context, device=device)

    def run() -> torch.Tensor:
        cache = model.new_cache(batch, context)
        x = model.model.embed_tokens(ids)
        for i, block in enumerate(model.blocks):
            x = block(x, positions, cache.layers[i])
        return model.lm_head(model.model.norm(x[:, -1:]))

    times = []
    with torch.no_grad():
        try:
            run()
            synchronize(device)
            for _ in range(reps):
                if device.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    out = run()
                    e.record()
                    torch.cuda.synchronize(device)
                    times.append(s.elapsed_time(e))
                else:
                    t0 = time.perf_counter()
                    out = run()
                    times.append((time.perf_counter() - t0) * 1e3)
            finite = logits_finite(out)
        finally:
            free_memory(device)
    ms = median(times)
    return {
        "placement": code,
        "context": context,
        "batch": batch,
        "ms": ms,
        "tokens_per_s": batch * context / ms * 1e3,
        "reps": reps,
        "finite": finite,
    }


# --------------------------------------------------------------------------------------------
# Pieces for the cost tables


def piece_model(spec: ModelSpec, blocks: int, device: torch.device, seed: int = 0) -> Supernet:
    """A supernet of the first ``blocks`` layers of ``spec`` (every mixer), embedding and head, random weights."""
    config = dict(spec.config)
    decoder = dict(config["decoder"])
    decoder["num_blocks"] = blocks
    config["decoder"] = decoder
    small = ModelSpec.from_config(config, name=f"{spec.name}[:{blocks}]")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Supernet(small, device=device, dtype=dtype, seed=seed).eval()


class PieceBench:
    """Times blocks, mixer-less blocks and the head of a :func:`piece_model` (see the module docstring)."""

    def __init__(self, model: Supernet, *, replays: int = 20, budget_s: float = 0.4) -> None:
        self.model = model
        self.device = model.device
        self.k_max = model.spec.num_layers
        self.replays = replays
        self.budget_s = budget_s
        self.gen = torch.Generator(device=self.device).manual_seed(1)

    def _hidden(self, batch: int) -> torch.Tensor:
        d = self.model.spec.hidden_size
        return torch.randn(batch, 1, d, device=self.device, dtype=self.model.dtype, generator=self.gen)

    def _time(self, fn: Callable[[], Any]) -> Timing:
        captured = CapturedStep(fn, self.device)
        try:
            return captured.time(self.replays, budget_s=self.budget_s)
        finally:
            captured.close()

    def head(self, batch: int) -> Timing:
        """Position reset and advance, embedding lookup, final norm, LM head (per step)."""
        m = self.model
        token = torch.randint(0, m.spec.vocab_size, (batch,), device=self.device, generator=self.gen)
        pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        pos0 = pos.clone()

        def fn() -> torch.Tensor:
            pos.copy_(pos0)
            x = m.model.embed_tokens(token[:, None])
            logits = m.head_step(x)
            pos.add_(1)
            return logits

        return self._time(fn)

    def shared(self, batch: int, k: int | None = None) -> Timing:
        """``x + mlp(post_norm(x))`` over ``k`` distinct blocks; times are per block."""
        k = min(k or self.k_max, self.k_max)
        blocks = list(self.model.blocks)[:k]
        x0 = self._hidden(batch)

        nxt = [blocks[(j + 1) % k].post_attention_layernorm for j in range(k)]  # as in a step: each writes the next's

        def fn() -> torch.Tensor:
            x = x0
            for blk, norm in zip(blocks, nxt, strict=True):
                x = blk.mlp_step(x, norm)
            return K.plain_rows(x)

        t = self._time(fn)
        return Timing([v / k for v in t.times_ms], t.graph_pool_bytes)

    def step_context(self, mixer: str, context: int, batch: int) -> Timing:
        """What a decode step with ``mixer`` layers at ``context`` builds once for all of them, per step
        (:meth:`StepContext.attention`, what its attention layers read). An attention mixer only.

        The cache's keys are a zero-stride view (only its size and ring matter here), so any batch fits."""
        spec = self.model.spec.mixer(0, mixer)
        if not isinstance(spec, AttentionSpec):
            raise ValueError(f"step_context: {mixer!r} is not an attention mixer")
        one = layer_cache(spec, 1, context, device=self.device, dtype=self.model.dtype)
        if not isinstance(one, AttentionCache):
            raise ValueError(f"step_context: {mixer!r} has no attention cache")
        cache = AttentionCache(one.k.expand(batch, *one.k.shape[1:]), one.v.expand(batch, *one.v.shape[1:]),
                               one.slots, one.ring)  # fmt: skip
        pos = torch.full((batch,), context - 1, dtype=torch.long, device=self.device)

        def fn() -> tuple:
            return tuple(StepContext(pos).attention(cache, spec.head_size, spec.rope_theta, self.model.dtype))

        return self._time(fn)

    def allocate(self, mixer: str, context: int, rows: int) -> tuple[Any, torch.Tensor]:
        """One cache of ``rows`` sequences for ``mixer`` at ``context``, random, positions at ``context - 1``."""
        spec = self.model.spec.mixer(0, mixer)
        big = layer_cache(spec, rows, context, device=self.device, dtype=self.model.dtype)
        fill_random_(layer_tensors(big), self.gen)
        pos = torch.full((rows,), context - 1, dtype=torch.long, device=self.device)
        return big, pos

    def layer(self, mixer: str, big: Any, pos: torch.Tensor, batch: int, k: int) -> Timing:
        """Full decoder blocks with ``mixer`` over ``k`` distinct blocks and cache row ranges; per block.

        The ``k`` blocks share one :class:`StepContext` built inside the graph, as a decode step's layers do
        (RoPE tables, ring slots and validity masks once per step, not once per layer): a block's time holds
        ``1/k`` of that step-wide work, where a whole model spreads it over all its layers of the mixer.
        """
        blocks = list(self.model.blocks)[:k]
        for blk in blocks:
            blk.mixer.active = mixer
        caches = [row_view(big, j * batch, (j + 1) * batch) for j in range(k)]
        p = pos[:batch]
        x0 = self._hidden(batch)

        nxt = [blocks[(j + 1) % k].input_layernorm for j in range(k)]  # as in a step: each writes the next's norm

        def fn() -> torch.Tensor:
            x, ctx = x0, StepContext(p)
            for blk, c, norm in zip(blocks, caches, nxt, strict=True):
                x = blk(x, p, c, decode=True, ctx=ctx, next_norm=norm)
            return K.plain_rows(x)

        t = self._time(fn)
        return Timing([v / k for v in t.times_ms], t.graph_pool_bytes)


# --------------------------------------------------------------------------------------------
# Ceilings


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 4 * GiB, reps: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes read plus bytes written per second, in GB/s."""
    n = nbytes // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    try:
        b.copy_(a)
        synchronize(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                b.copy_(a)
                e.record()
                torch.cuda.synchronize(device)
                times.append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                b.copy_(a)
                times.append(time.perf_counter() - t0)
        return 2 * a.nbytes / median(times) / 1e9
    finally:
        del a, b
        free_memory(device)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 (CUDA) / fp32 (CPU) square matmul rate on random data, TFLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    try:
        a @ b
        synchronize(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / median(times) / 1e12
    finally:
        del a, b
        free_memory(device)


# --------------------------------------------------------------------------------------------
# One placement under a policy (the CLI's --measure)


def measure_throughput(
    spec: ModelSpec,
    placement: Any,
    context: int,
    policy: Any,
    memory_gib: float | None = None,
    *,
    overheads: RuntimeOverheads | None = None,
    device: str | torch.device = "cuda",
    replays: int = 20,
) -> dict[str, Any]:
    """Build a thin random model of ``placement`` on the GPU and measure its decode step under ``policy``.

    The batch of ``max_fit`` comes from the memory model with ``memory_gib`` (default: the GPU's memory).
    Returns the measurement, the batch, the memory breakdown and the device facts.
    """
    from placement_search.evaluators.cost_model import resolve_batch
    from placement_search.presets import BatchPolicy

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    pol = policy if isinstance(policy, BatchPolicy) else BatchPolicy.parse(str(policy))
    p = Placement.parse(placement, spec.search_space)
    info = device_info(dev)
    budget = memory_gib if memory_gib is not None else info.get("device_memory_gib", 0.0)
    ov = overheads or RuntimeOverheads()
    batch, mem = resolve_batch(spec, p.mixers, context, pol, float(budget), ov)
    model = Supernet(spec, mixers_for(spec, [p]), device=dev, dtype=torch.bfloat16, seed=0).eval()
    try:
        m = measure_decode(model, p, context, batch, replays=replays)
    finally:
        del model
        free_memory(dev)
    predicted = memory_breakdown(spec, p.mixers, context, batch, overheads=ov)
    return {
        "measurement": m,
        "batch": batch,
        "policy": pol,
        "memory_budget_gib": float(budget),
        "memory": mem if mem is not None else predicted,
        "device": info,
        "env": {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")},
    }
