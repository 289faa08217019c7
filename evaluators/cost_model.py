"""Decode cost model: measured per-layer cost tables that predict the step time and throughput of any placement.

A *cost table* (JSON, loadable without torch or a GPU) holds, for one model on one GPU:

- ``layer_ms[mixer][context]``: the time of one whole decoder block with that mixer (input norm, mixer step
  with its cache, residual, post norm, shared MLP, residual) over a grid of batches, per context length;
- ``shared_layer_ms``: the same block without its mixer (norm + MLP + residual) over the batch grid, so that
  ``layer_ms - shared_layer_ms`` is the mixer's own cost (reported, not needed for predictions);
- ``head_ms``: everything outside the blocks (position update, embedding lookup, final norm, LM head);
- ``step_context_ms[mixer][context]`` (optional): the step-wide work a step with layers of that mixer does once,
  however many there are: the attention mixers' RoPE tables, write slots and validity mask
  (:class:`~placement_search.evaluators.cache.StepContext`); ``layer_ms`` then excludes it;
- ``memory``: the runtime overheads of the memory model (:mod:`.memory`) used by the ``max_fit`` policy.

Why per-block pieces timed inside CUDA graphs, rather than differences of whole-model all-X placements: under
``max_fit`` a mixed placement runs at batches that no all-X placement fits (one full-attention layer among
GDN layers at 32K decodes ~60 sequences where all-attention fits ~17), so per-mixer costs must be known at
batches beyond any all-X placement's memory limit. A block is timed in a graph of ``k`` distinct blocks with
their own weights and caches (so L2 holds nothing from the previous replay), which needs only a few blocks'
weights and lets one block's cache use most of the GPU. Whole-model steps of random placements (one CUDA graph
per step) validate the sum (``benchmarks/cost_model_accuracy.py``).

Prediction of placement ``p`` at context ``L`` and batch ``B``::

    step_ms = head_ms(B) + sum_l layer_ms[p_l](L, B) + sum_{m in p} step_context_ms[m](L, B)
    tokens/s = B / step_ms * 1000

interpolated linearly in ``B`` between grid batches and linearly in ``L`` between grid contexts (KV reads grow
linearly with the context; the other mixers do not depend on it). Outside the grid it refuses (one-line
:class:`CostModelError`); it never extrapolates. The batch comes from the policy: ``fixed:B``, or ``max_fit``
(the largest batch the memory budget holds, :func:`~.memory.max_batch`, optionally capped).

Two simpler variants, as in the Super Apriel paper, for comparison:

- ``idealized``: one constant per mixer (the per-layer share of the all-X step at a reference context and
  batch), whatever the context and batch;
- ``regression``: step time linear in the mixer counts, ``sum_m coef_m * n_m``, least-squares fitted to
  measured whole-model placements at one condition (context, policy, budget).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from placement_search.errors import PlacementSearchError
from placement_search.evaluators.memory import (
    GiB,
    MemoryBreakdown,
    MemoryModelError,
    RuntimeOverheads,
    max_batch,
    memory_breakdown,
    mixer_cache_bytes,
)
from placement_search.files import load_json, write_json_atomic
from placement_search.placement import Placement
from placement_search.presets import BatchPolicy, Conditions, Throughput
from placement_search.spec import ModelSpec, get_spec

FORMAT = "placement-search/cost-table"
FORMAT_VERSION = 1
VARIANTS = ("table", "idealized", "regression")
#: Contexts of the shipped tables.
DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536, 131072)
#: Reference condition of the idealized variant (context, batch).
IDEALIZED_REFERENCE = (32768, 16)


class CostModelError(PlacementSearchError):
    """A malformed cost table, or a question outside what a table can answer."""


def batch_grid(top: int) -> list[int]:
    """Batches measured up to ``top``: 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x), then ``top``."""
    if top < 1:
        return []
    out: list[int] = []
    p = 1
    while p <= top:
        for b in (p, p * 3 // 2):
            if 1 <= b <= top and b not in out:
                out.append(b)
        p *= 2
    if out[-1] != top:
        out.append(top)
    return out


def dense_batch_grid(top: int) -> list[int]:
    """A denser grid for the shipped tables: every batch to 8, every 4 to 64, every 16 to 256, then 1.25x.

    Decode kernels split work over (sequence, head) tiles, so their cost steps with the number of waves over
    the SMs (measured on the H200: attention at 32K costs as much per sequence at 24 and 48 as at 16 and 32
    plus a whole wave); a grid this dense keeps linear interpolation within ~1% of the steps.
    """
    if top < 1:
        return []
    out = list(range(1, min(8, top) + 1))
    out += list(range(12, min(64, top) + 1, 4))
    out += list(range(80, min(256, top) + 1, 16))
    b = 256
    while True:
        b = int(b * 1.25) // 8 * 8
        if b > top:
            break
        out.append(b)
    if out[-1] != top:
        out.append(top)
    return out


# --------------------------------------------------------------------------------------------
# Curves and interpolation


@dataclass(frozen=True)
class Curve:
    """Milliseconds at increasing batches; linear in between, refused outside."""

    batches: tuple[int, ...]
    ms: tuple[float, ...]

    def at(self, batch: float, what: str = "curve") -> float:
        b = self.batches
        if not b[0] <= batch <= b[-1]:
            raise CostModelError(
                f"batch {batch:g} is outside the measured grid of {what} ({b[0]}..{b[-1]}); tables do not extrapolate"
            )
        lo, hi = 0, len(b) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if b[mid] <= batch:
                lo = mid
            else:
                hi = mid
        if b[lo] == batch or lo == hi:
            return self.ms[lo]
        if b[hi] == batch:
            return self.ms[hi]
        t = (batch - b[lo]) / (b[hi] - b[lo])
        return self.ms[lo] + t * (self.ms[hi] - self.ms[lo])

    def to_dict(self) -> dict[str, Any]:
        return {"batches": list(self.batches), "ms": [round(x, 6) for x in self.ms]}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Curve:
        if not isinstance(data, Mapping):
            raise CostModelError(f"{where}: expected an object with 'batches' and 'ms'")
        batches, ms = data.get("batches"), data.get("ms")
        if not isinstance(batches, list) or not batches:
            raise CostModelError(f"{where}.batches: expected a non-empty list of batches")
        if not isinstance(ms, list) or len(ms) != len(batches):
            raise CostModelError(f"{where}.ms: expected a list of {len(batches)} times (one per batch)")
        for i, b in enumerate(batches):
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise CostModelError(f"{where}.batches[{i}]: expected a positive integer, got {b!r}")
            if i and b <= batches[i - 1]:
                raise CostModelError(f"{where}.batches[{i}]: batches must increase ({batches[i - 1]} then {b})")
        for i, t in enumerate(ms):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise CostModelError(f"{where}.ms[{i}]: expected a positive time in ms, got {t!r}")
        return cls(tuple(batches), tuple(float(t) for t in ms))


def interpolate_context(curves: Mapping[int, Curve], context: int, batch: float, what: str) -> float:
    """Linear in the context between the two bracketing grid contexts (each interpolated in the batch)."""
    ctxs = sorted(curves)
    if not ctxs[0] <= context <= ctxs[-1]:
        raise CostModelError(
            f"context {context} is outside the table's grid for {what} ({ctxs[0]}..{ctxs[-1]}); "
            "tables do not extrapolate"
        )
    hi = next(i for i, c in enumerate(ctxs) if c >= context)
    c1 = ctxs[hi]
    v1 = curves[c1].at(batch, f"{what} at context {c1}")
    if c1 == context:
        return v1
    c0 = ctxs[hi - 1]
    v0 = curves[c0].at(batch, f"{what} at context {c0}")
    return v0 + (v1 - v0) * (context - c0) / (c1 - c0)


# --------------------------------------------------------------------------------------------
# Predictions


@dataclass(frozen=True)
class Prediction:
    """A decode throughput figure with everything it holds under."""

    placement: str
    counts: dict[str, int]
    context: int
    batch: int
    policy: BatchPolicy
    memory_budget_gib: float
    gpu: str
    step_ms: float
    variant: str
    memory: MemoryBreakdown
    source: str
    speedup: float | None = None
    measured: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_ms * 1e3

    @property
    def conditions(self) -> Conditions:
        return Conditions(
            context_length=self.context,
            batch_policy=self.policy,
            gpu=self.gpu,
            memory_budget_gib=round(self.memory_budget_gib, 3),
            dtype="bfloat16",
        )

    @property
    def throughput(self) -> Throughput:
        return Throughput(
            tokens_per_s=round(self.tokens_per_s, 3),
            speedup=None if self.speedup is None else round(self.speedup, 4),
            batch=self.batch,
            step_time_ms=round(self.step_ms, 4),
            source=self.source,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "placement": self.placement,
            "counts": dict(self.counts),
            "variant": self.variant,
            "measured": self.measured,
            "conditions": self.conditions.to_dict(),
            "throughput": self.throughput.to_dict(),
            "memory_gib": self.memory.gib(),
        }
        out.update(self.extra)
        return out

    def summary(self) -> str:
        """One line: placement, conditions, batch, step time, tokens/s."""
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        speed = "" if self.speedup is None else f", {self.speedup:.2f}x all-attention"
        how = "measured" if self.measured else f"predicted ({self.variant})"
        return (
            f"{self.placement} ({counts}): {self.tokens_per_s:,.1f} tokens/s{speed} at batch {self.batch}, "
            f"step {self.step_ms:.3f} ms; context {self.context}, {self.policy}, "
            f"{self.memory_budget_gib:.1f} GiB, {self.gpu} [{how}]"
        )


def resolve_batch(
    spec: ModelSpec,
    mixers: Sequence[str],
    context: int,
    policy: BatchPolicy,
    budget_gib: float,
    overheads: RuntimeOverheads,
    resident: str = "placement",
) -> tuple[int, MemoryBreakdown]:
    """The batch ``policy`` gives ``mixers`` at ``context`` under ``budget_gib``, and its memory breakdown.

    ``fixed:B`` must fit the budget too; ``max_fit`` must fit at least one sequence.
    """
    budget = budget_gib * GiB
    if policy.kind == "fixed":
        batch = int(policy.batch or 0)
    else:
        batch = max_batch(spec, mixers, context, budget, resident=resident, overheads=overheads)
        if batch == 0:
            one = memory_breakdown(spec, mixers, context, 1, resident=resident, overheads=overheads)
            raise CostModelError(
                f"not even one sequence fits {budget_gib:.1f} GiB at context {context} "
                f"(batch 1 needs {one.total / GiB:.1f} GiB)"
            )
        if policy.cap is not None:
            batch = min(batch, policy.cap)
    mem = memory_breakdown(spec, mixers, context, batch, resident=resident, overheads=overheads)
    if mem.total > budget:
        raise CostModelError(
            f"batch {batch} at context {context} needs {mem.total / GiB:.1f} GiB, more than the "
            f"{budget_gib:.1f} GiB budget (use max_fit, or a smaller batch)"
        )
    return batch, mem


# --------------------------------------------------------------------------------------------
# The table


def _check_keys(data: Mapping[str, Any], required: Iterable[str], where: str) -> None:
    for key in required:
        if key not in data:
            raise CostModelError(f"{where}: missing key {key!r}")


def _pos_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CostModelError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _pos_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CostModelError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RegressionFit:
    """``step_ms = sum_m coef_ms[m] * n_m`` fitted at one condition."""

    context: int
    batch_policy: BatchPolicy
    memory_budget_gib: float
    coef_ms: dict[str, float]
    n: int
    rmse_ms: float

    def matches(self, context: int, policy: BatchPolicy, budget_gib: float) -> bool:
        return (
            self.context == context
            and str(self.batch_policy) == str(policy)
            and abs(self.memory_budget_gib - budget_gib) < 1e-6
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "batch_policy": str(self.batch_policy),
            "memory_budget_gib": self.memory_budget_gib,
            "coef_ms": {k: round(v, 6) for k, v in self.coef_ms.items()},
            "n": self.n,
            "rmse_ms": round(self.rmse_ms, 6),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RegressionFit:
        if not isinstance(data, Mapping):
            raise CostModelError(f"{where}: expected an object")
        _check_keys(data, ("context", "batch_policy", "memory_budget_gib", "coef_ms", "n"), where)
        coef = data["coef_ms"]
        if not isinstance(coef, Mapping) or not coef:
            raise CostModelError(f"{where}.coef_ms: expected an object of mixer -> ms")
        for k, v in coef.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CostModelError(f"{where}.coef_ms.{k}: expected a number, got {v!r}")
        try:
            policy = BatchPolicy.parse(str(data["batch_policy"]))
        except PlacementSearchError as e:
            raise CostModelError(f"{where}.batch_policy: {e}") from None
        return cls(
            context=_pos_int(data["context"], f"{where}.context"),
            batch_policy=policy,
            memory_budget_gib=_pos_float(data["memory_budget_gib"], f"{where}.memory_budget_gib"),
            coef_ms={k: float(v) for k, v in coef.items()},
            n=_pos_int(data["n"], f"{where}.n"),
            rmse_ms=float(data.get("rmse_ms", 0.0)),
        )


def fit_regression(
    rows: Sequence[tuple[Mapping[str, int], float]], mixers: Sequence[str]
) -> tuple[dict[str, float], float]:
    """Least-squares ``step_ms ~ sum_m coef_m * count_m`` (no intercept: the counts sum to the layer count).

    Returns ``(coef_ms, rmse_ms)``. Mixers absent from every row get coefficient 0 (not identifiable).
    """
    import numpy as np

    if not rows:
        raise CostModelError("regression needs at least one measured placement")
    used = [m for m in mixers if any(c.get(m, 0) for c, _ in rows)]
    x = np.array([[float(c.get(m, 0)) for m in used] for c, _ in rows])
    y = np.array([float(t) for _, t in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    rmse = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
    out = {m: 0.0 for m in mixers}
    out.update({m: float(c) for m, c in zip(used, coef, strict=True)})
    return out, rmse


@dataclass(frozen=True)
class CostTable:
    """A measured decode cost table (see the module docstring); build with :meth:`from_dict` or :meth:`load`."""

    model: str
    config_hash: str
    num_layers: int
    mixers: tuple[str, ...]
    gpu: str
    device_memory_gib: float
    dtype: str
    contexts: tuple[int, ...]
    head: Curve
    shared_layer: Curve
    layers: dict[str, dict[int, Curve]]
    overheads: RuntimeOverheads
    step_context: dict[str, dict[int, Curve]] = field(default_factory=dict)
    idealized: dict[str, Any] | None = None
    regression: tuple[RegressionFit, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "<table>"

    # -- io -------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, source: str = "<table>") -> CostTable:
        """Validate and parse; every error is one line naming ``source`` and the key path."""
        try:
            return cls._parse(data, source)
        except CostModelError as e:
            msg = str(e)
            raise CostModelError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    @classmethod
    def _parse(cls, data: Any, source: str) -> CostTable:
        if not isinstance(data, Mapping):
            raise CostModelError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise CostModelError(f"format: expected {FORMAT!r}, got {data.get('format')!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise CostModelError(
                f"format_version: this version reads {FORMAT_VERSION}, got {data.get('format_version')!r}"
            )
        _check_keys(
            data,
            ("model", "gpu", "device_memory_gib", "contexts", "head_ms", "shared_layer_ms", "layer_ms", "memory"),
            "(top level)",
        )
        model = data["model"]
        if not isinstance(model, Mapping):
            raise CostModelError("model: expected an object")
        _check_keys(model, ("name", "config_hash", "num_layers", "mixers"), "model")
        mixers = model["mixers"]
        if not isinstance(mixers, list) or not mixers or not all(isinstance(m, str) and m for m in mixers):
            raise CostModelError("model.mixers: expected a non-empty list of mixer names")
        contexts = data["contexts"]
        if not isinstance(contexts, list) or not contexts:
            raise CostModelError("contexts: expected a non-empty list of context lengths")
        ctx = tuple(_pos_int(c, f"contexts[{i}]") for i, c in enumerate(contexts))
        if list(ctx) != sorted(set(ctx)):
            raise CostModelError("contexts: must increase strictly")
        layer_ms = data["layer_ms"]
        if not isinstance(layer_ms, Mapping):
            raise CostModelError("layer_ms: expected an object of mixer -> context -> curve")
        for m in mixers:
            if m not in layer_ms:
                raise CostModelError(f"layer_ms: missing mixer {m!r}")
        layers = _curves_by_mixer_and_context(layer_ms, mixers, ctx, "layer_ms")
        layers = {m: layers[m] for m in mixers}  # in the model's order
        step_ctx_ms = data.get("step_context_ms") or {}
        if not isinstance(step_ctx_ms, Mapping):
            raise CostModelError("step_context_ms: expected an object of mixer -> context -> curve")
        step_context = _curves_by_mixer_and_context(step_ctx_ms, mixers, ctx, "step_context_ms")
        try:
            overheads = RuntimeOverheads.from_dict(dict(data["memory"]), "memory")
        except (MemoryModelError, TypeError, ValueError) as e:
            raise CostModelError(str(e)) from None
        idealized = data.get("idealized")
        if idealized is not None:
            if not isinstance(idealized, Mapping) or not isinstance(idealized.get("layer_ms"), Mapping):
                raise CostModelError("idealized: expected an object with 'layer_ms' (mixer -> ms)")
            for m in mixers:
                _pos_float(idealized["layer_ms"].get(m), f"idealized.layer_ms.{m}")
        reg = data.get("regression") or []
        if not isinstance(reg, list):
            raise CostModelError("regression: expected a list of fits")
        regression = tuple(RegressionFit.from_dict(r, f"regression[{i}]") for i, r in enumerate(reg))
        known = {
            "format", "format_version", "model", "gpu", "device_memory_gib", "dtype", "contexts", "head_ms",
            "shared_layer_ms", "layer_ms", "memory", "idealized", "regression", "provenance", "step_context_ms",
        }  # fmt: skip
        prov = data.get("provenance") or {}
        if not isinstance(prov, Mapping):
            raise CostModelError("provenance: expected an object")
        gpu = data["gpu"]
        if not isinstance(gpu, str) or not gpu:
            raise CostModelError("gpu: expected the GPU's name")
        hash_ = model["config_hash"]
        if not isinstance(hash_, str):
            raise CostModelError("model.config_hash: expected a string")
        return cls(
            model=str(model["name"]),
            config_hash=hash_,
            num_layers=_pos_int(model["num_layers"], "model.num_layers"),
            mixers=tuple(mixers),
            gpu=gpu,
            device_memory_gib=_pos_float(data["device_memory_gib"], "device_memory_gib"),
            dtype=str(data.get("dtype", "bfloat16")),
            contexts=ctx,
            head=Curve.from_dict(data["head_ms"], "head_ms"),
            shared_layer=Curve.from_dict(data["shared_layer_ms"], "shared_layer_ms"),
            layers=layers,
            overheads=overheads,
            step_context=step_context,
            idealized=None if idealized is None else dict(idealized),
            regression=regression,
            provenance=dict(prov),
            extra={k: v for k, v in data.items() if k not in known},
            source=source,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostTable:
        """Read and validate a cost-table JSON file."""
        try:
            data = load_json(path)
        except PlacementSearchError as e:
            raise CostModelError(str(e)) from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {
                "name": self.model,
                "config_hash": self.config_hash,
                "num_layers": self.num_layers,
                "mixers": list(self.mixers),
            },
            "gpu": self.gpu,
            "device_memory_gib": self.device_memory_gib,
            "dtype": self.dtype,
            "contexts": list(self.contexts),
            "head_ms": self.head.to_dict(),
            "shared_layer_ms": self.shared_layer.to_dict(),
            "layer_ms": {m: {str(c): cur.to_dict() for c, cur in per.items()} for m, per in self.layers.items()},
            "memory": self.overheads.to_dict(),
        }
        if self.step_context:
            out["step_context_ms"] = {m: {str(c): cur.to_dict() for c, cur in per.items()}
                                      for m, per in self.step_context.items()}  # fmt: skip
        if self.idealized is not None:
            out["idealized"] = self.idealized
        if self.regression:
            out["regression"] = [r.to_dict() for r in self.regression]
        out["provenance"] = self.provenance
        out.update(self.extra)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table atomically (after re-validating it)."""
        data = self.to_dict()
        CostTable.from_dict(data, source=str(path))
        return write_json_atomic(path, data)

    # -- costs ----------------------------------------------------------------------------------

    def layer_ms(self, mixer: str, context: int, batch: float) -> float:
        """Time of one block with ``mixer`` at ``context`` and ``batch`` (interpolated)."""
        if mixer not in self.layers:
            raise CostModelError(f"{self.source}: no costs for mixer {mixer!r}; the table has {', '.join(self.mixers)}")
        return interpolate_context(self.layers[mixer], context, batch, f"mixer {mixer}")

    def mixer_ms(self, mixer: str, context: int, batch: float) -> float:
        """The mixer's own share of a block (block minus the shared norm + MLP part)."""
        return self.layer_ms(mixer, context, batch) - self.shared_layer.at(batch, "the shared layer")

    def step_ms(self, mixers: Sequence[str], context: int, batch: float) -> float:
        """Decode step time of the placement ``mixers`` (one name per layer)."""
        if len(mixers) != self.num_layers:
            raise CostModelError(f"placement has {len(mixers)} layers, the table's model has {self.num_layers}")
        per = {m: self.layer_ms(m, context, batch) for m in set(mixers)}
        head = self.head.at(batch, "the head")
        return head + sum(per[m] for m in mixers) + self.step_context_ms(mixers, context, batch)

    def step_context_ms(self, mixers: Iterable[str], context: int, batch: float) -> float:
        """The step-wide work of a step with layers of ``mixers``: once per mixer present (0 without such terms)."""
        return sum(interpolate_context(self.step_context[m], context, batch, f"the step context of {m}")
                   for m in sorted(set(mixers)) if m in self.step_context)  # fmt: skip

    def idealized_step_ms(self, mixers: Sequence[str]) -> float:
        """Idealized variant: one constant per mixer, whatever the context and batch."""
        if self.idealized is None:
            raise CostModelError(f"{self.source}: the table has no idealized constants")
        return sum(float(self.idealized["layer_ms"][m]) for m in mixers)

    def regression_step_ms(
        self, counts: Mapping[str, int], context: int, policy: BatchPolicy, budget_gib: float
    ) -> float:
        """Regression variant at a condition it was fitted for."""
        for fit in self.regression:
            if fit.matches(context, policy, budget_gib):
                return sum(fit.coef_ms.get(m, 0.0) * n for m, n in counts.items())
        have = "; ".join(f"{f.context}/{f.batch_policy}/{f.memory_budget_gib:g} GiB" for f in self.regression)
        raise CostModelError(
            f"{self.source}: no regression fitted for context {context}, {policy}, {budget_gib:g} GiB"
            f" (fitted: {have or 'none'})"
        )

    # -- predictions ----------------------------------------------------------------------------

    def spec(self) -> ModelSpec:
        """The registered model spec of this table (checked against the table's config hash)."""
        spec = get_spec(self.model)
        self.check_spec(spec)
        return spec

    def check_spec(self, spec: ModelSpec) -> None:
        if spec.config_hash != self.config_hash:
            raise CostModelError(
                f"{self.source}: measured for config {self.config_hash}, not {spec.name}'s ({spec.config_hash})"
            )
        missing = sorted(set(spec.mixer_names) - set(self.mixers))
        if missing:
            raise CostModelError(f"{self.source}: no costs for mixer {missing[0]!r} of {spec.name}")

    def predict(
        self,
        placement: Any,
        context: int,
        policy: BatchPolicy | str,
        memory_gib: float | None = None,
        *,
        variant: str = "table",
        spec: ModelSpec | None = None,
        speedup: bool = True,
    ) -> Prediction:
        """Predicted decode throughput of ``placement`` (anything :meth:`Placement.parse` reads).

        ``memory_gib`` defaults to the measuring GPU's memory. ``speedup`` adds the ratio to all-attention
        (the model's main mixer in every layer) under the same conditions, when that fits.
        """
        if variant not in VARIANTS:
            raise CostModelError(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}")
        if isinstance(policy, str):
            policy = BatchPolicy.parse(policy)
        if spec is None:
            spec = self.spec()
        else:
            self.check_spec(spec)
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise CostModelError(f"context must be a positive integer, got {context!r}")
        p = Placement.parse(placement, spec.search_space)
        budget = self.device_memory_gib if memory_gib is None else float(memory_gib)
        if not budget > 0:
            raise CostModelError(f"memory budget must be positive, got {budget:g} GiB")
        batch, mem = resolve_batch(spec, p.mixers, context, policy, budget, self.overheads)
        counts = {m: p.mixers.count(m) for m in spec.search_space.mixers}
        if variant == "table":
            step = self.step_ms(p.mixers, context, batch)
        elif variant == "idealized":
            step = self.idealized_step_ms(p.mixers)
        else:
            step = self.regression_step_ms(counts, context, policy, budget)
        ratio = None
        if speedup:
            main = [layer.main_mixer for layer in spec.layers]
            try:
                base = self.predict(main, context, policy, budget, variant=variant, spec=spec, speedup=False)
                ratio = (batch / step) / base.tokens_per_s * 1e3
            except CostModelError:
                ratio = None
        return Prediction(
            placement=p.code(),
            counts=counts,
            context=context,
            batch=batch,
            policy=policy,
            memory_budget_gib=budget,
            gpu=self.gpu,
            step_ms=step,
            variant=variant,
            memory=mem,
            source=f"cost table {Path(self.source).name} ({variant})",
            speedup=ratio,
        )


# --------------------------------------------------------------------------------------------
# Building a table from raw measurements


def context_independent(spec: ModelSpec, mixer: str, contexts: Sequence[int]) -> bool:
    """True when ``mixer``'s cache (hence its decode work) is the same at every context of ``contexts``."""
    sizes = {
        mixer_cache_bytes(layer.mixers[mixer], c) for layer in spec.layers if mixer in layer.mixers for c in contexts
    }
    return len(sizes) == 1


def _context_checks(by_ctx: Mapping[int, Curve], reference: int) -> dict[str, Any]:
    """For a context-independent mixer: each other context's measured points as relative deviations from the
    ``reference`` context's curve at the same batches (inside its grid)."""
    ref = by_ctx[reference]
    out: dict[str, Any] = {}
    for c, curve in sorted(by_ctx.items()):
        if c == reference:
            continue
        pts = [(b, ms) for b, ms in zip(curve.batches, curve.ms, strict=True) if b <= ref.batches[-1]]
        if pts:
            out[str(c)] = {"reference_context": reference, "batches": [b for b, _ in pts],
                           "deviation": [round(ms / ref.at(b) - 1, 4) for b, ms in pts]}  # fmt: skip
    return out


def smooth_curve(curve: Curve, from_batch: int) -> Curve:
    """``curve`` with its points at batches >= ``from_batch`` moved onto their least-squares line.

    The grid is kept (so the first point at ``from_batch`` still joins the unsmoothed part); with fewer than
    three such points the curve is returned unchanged.
    """
    idx = [i for i, b in enumerate(curve.batches) if b >= from_batch]
    if len(idx) < 3:
        return curve
    xs = [float(curve.batches[i]) for i in idx]
    ys = [curve.ms[i] for i in idx]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    ms = list(curve.ms)
    for i, x in zip(idx, xs, strict=True):
        ms[i] = my + slope * (x - mx)
    return Curve(curve.batches, tuple(ms))


def _curves_by_mixer_and_context(
    data: Mapping[str, Any], mixers: Sequence[str], contexts: Sequence[int], key: str
) -> dict[str, dict[int, Curve]]:
    """``data[mixer][context]`` curves (``key``: where in the table, for errors): every mixer of ``data`` one of
    ``mixers``, every one of ``contexts`` present and no other."""
    out: dict[str, dict[int, Curve]] = {}
    for m, per in data.items():
        if m not in mixers:
            raise CostModelError(f"{key}: mixer {m!r} is not in model.mixers")
        if not isinstance(per, Mapping):
            raise CostModelError(f"{key}.{m}: expected an object of context -> curve")
        out[m] = {}
        for c in contexts:
            if str(c) not in per:
                raise CostModelError(f"{key}.{m}: missing context {c}")
            out[m][c] = Curve.from_dict(per[str(c)], f"{key}.{m}.{c}")
        extra_ctx = sorted(set(per) - {str(c) for c in contexts})
        if extra_ctx:
            raise CostModelError(f"{key}.{m}: context {extra_ctx[0]!r} is not in contexts")
    return out


def _clamped(curve: Curve, batch: float) -> float:
    """``curve`` at ``batch`` moved inside its grid (for a nearly flat curve measured at a few batches)."""
    return curve.at(min(max(batch, curve.batches[0]), curve.batches[-1]))


def _step_context_curves(
    rows: Sequence[Mapping[str, Any]], spec: ModelSpec, contexts: Sequence[int]
) -> dict[str, dict[int, Curve]]:
    """Measured step-context curves by mixer and measured context (one context for a context-independent mixer)."""
    out: dict[str, dict[int, Curve]] = {}
    for m in spec.mixer_names:
        mine = [r for r in rows if r["mixer"] == m]
        if not mine:
            continue
        by_ctx = {c: _curve((r["batch"], r["ms"]) for r in mine if int(r["context"]) == c)
                  for c in sorted({int(r["context"]) for r in mine})}  # fmt: skip
        if context_independent(spec, m, list(contexts) + list(by_ctx)):
            by_ctx = {0: max(by_ctx.values(), key=lambda cur: len(cur.batches))}  # 0: every context
        out[m] = by_ctx
    return out


def _context_curve(by_ctx: Mapping[int, Curve], context: int, mixer: str, source: str) -> Curve:
    if 0 in by_ctx:
        return by_ctx[0]
    if context not in by_ctx:
        raise CostModelError(f"{source}: the step context of {mixer!r} was not measured at context {context}")
    return by_ctx[context]


def _curve(points: Iterable[tuple[int, float]]) -> Curve:
    by_batch: dict[int, list[float]] = {}
    for b, t in points:
        by_batch.setdefault(int(b), []).append(float(t))
    batches = sorted(by_batch)
    return Curve(tuple(batches), tuple(median(by_batch[b]) for b in batches))


def build_table(
    raw: Mapping[str, Any],
    spec: ModelSpec,
    *,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    overheads: RuntimeOverheads | None = None,
    idealized_reference: tuple[int, int] = IDEALIZED_REFERENCE,
    smooth_from: Mapping[str, int] | None = None,
    source: str = "<built>",
) -> CostTable:
    """A :class:`CostTable` from the raw output of ``benchmarks/measure_decode.py``.

    ``raw["pieces"]`` rows: ``{"kind": "layer"|"shared"|"head", "mixer", "context", "batch", "ms"}`` (per block
    for layer/shared, per step for the head). A context-independent mixer (:func:`context_independent`) has one
    curve, its fullest measured grid, at every context (``measured_at_context`` says where from); its points
    measured at other contexts (``measure_decode.py`` times a few batches at the grid's ends) are checks of that
    independence, reported in ``context_checks`` as their relative deviation from the curve, not curves of their own
    (a check point off by a measurement artefact would otherwise be interpolated across the whole batch range).
    ``raw["step_context"]`` rows ``{"mixer", "context", "batch", "ms"}`` (per step; optional): the step-wide work of
    steps with that mixer (see the module docstring); each layer piece of that mixer, a ``k``-block graph
    (``"k"`` in its row) that built it once, is reduced by ``1/k`` of it (at the piece's batch, clamped to the
    measured range), and the table adds it once per step. ``raw["whole"]`` rows tagged ``"validation"`` fit the
    regression variant, grouped by condition.
    ``smooth_from[mixer] = B0``: that mixer's points at batches >= ``B0`` are replaced by their least-squares
    line (for a mixer whose measured cost alternates between levels from one batch to the next, the line is the
    expected cost; see :func:`smooth_curve`).
    """
    pieces = raw.get("pieces") or []
    meta = dict(raw.get("meta") or {})
    head = _curve((r["batch"], r["ms"]) for r in pieces if r["kind"] == "head")
    shared = _curve((r["batch"], r["ms"]) for r in pieces if r["kind"] == "shared")
    if not head.batches or not shared.batches:
        raise CostModelError(f"{source}: raw measurements hold no head or shared-layer pieces")
    step_context = _step_context_curves(raw.get("step_context") or [], spec, contexts)
    layers: dict[str, dict[int, Curve]] = {}
    measured_at: dict[str, dict[str, int]] = {}
    context_checks: dict[str, dict[str, Any]] = {}
    for m in spec.mixer_names:
        rows = [r for r in pieces if r["kind"] == "layer" and r["mixer"] == m]
        if m in step_context:  # each piece built the step context once for its k blocks
            rows = [{**r, "ms": r["ms"] - _clamped(_context_curve(step_context[m], int(r["context"]), m, source),
                                                   r["batch"]) / int(r.get("k", 1))} for r in rows]  # fmt: skip
        by_ctx: dict[int, Curve] = {}
        for c in sorted({int(r["context"]) for r in rows}):
            by_ctx[c] = _curve((r["batch"], r["ms"]) for r in rows if int(r["context"]) == c)
        if not by_ctx:
            raise CostModelError(f"{source}: no layer pieces for mixer {m!r}")
        layers[m] = {}
        measured_at[m] = {}
        independent = context_independent(spec, m, list(contexts) + list(by_ctx))
        if independent:  # one curve, the first of the fullest measured grids; other contexts' points check it
            fullest = max(by_ctx, key=lambda k: len(by_ctx[k].batches))
            if checks := _context_checks(by_ctx, fullest):
                context_checks[m] = checks
        for c in contexts:
            if independent:
                src = fullest
            elif c in by_ctx:
                src = c
            else:
                raise CostModelError(f"{source}: mixer {m!r} depends on the context and was not measured at {c}")
            curve = by_ctx[src]
            if smooth_from and m in smooth_from:
                curve = smooth_curve(curve, smooth_from[m])
            layers[m][c] = curve
            measured_at[m][str(c)] = src
    table_kwargs: dict[str, Any] = {
        "model": spec.name,
        "config_hash": spec.config_hash,
        "num_layers": spec.num_layers,
        "mixers": tuple(spec.mixer_names),
        "gpu": str(meta.get("gpu", "unknown GPU")),
        "device_memory_gib": float(meta.get("device_memory_gib", 0.0)) or 1.0,
        "dtype": str(meta.get("dtype", "bfloat16")),
        "contexts": tuple(contexts),
        "head": head,
        "shared_layer": shared,
        "layers": layers,
        "overheads": overheads or RuntimeOverheads(),
        "step_context": {m: {c: _context_curve(per, c, m, source) for c in contexts}
                         for m, per in step_context.items()},
        "source": source,
    }
    draft = CostTable(**table_kwargs)
    lref, bref = idealized_reference
    n = spec.num_layers
    try:
        head_ref = draft.head.at(bref)
        per_step = {m: head_ref + draft.step_context_ms([m], lref, bref) for m in spec.mixer_names}
        idealized = {
            "reference": {"context": lref, "batch": bref},
            "layer_ms": {m: round(draft.layer_ms(m, lref, bref) + per_step[m] / n, 6) for m in spec.mixer_names},
            "note": "per-layer share of the all-X step at the reference context and batch, used at every condition",
        }
    except CostModelError:
        idealized = None
    fits: list[RegressionFit] = []
    groups: dict[tuple[int, str, float], list[tuple[dict[str, int], float]]] = {}
    for r in raw.get("whole") or []:
        if r.get("tag") != "validation" or r.get("policy") is None:
            continue
        key = (int(r["context"]), str(r["policy"]), float(r["memory_budget_gib"]))
        p = Placement.parse(r["placement"], spec.search_space)
        groups.setdefault(key, []).append(({m: p.mixers.count(m) for m in spec.mixer_names}, float(r["step_ms"])))
    for (c, pol, budget), rows in sorted(groups.items()):
        coef, rmse = fit_regression(rows, spec.mixer_names)
        fits.append(RegressionFit(c, BatchPolicy.parse(pol), budget, coef, len(rows), rmse))
    prov = {
        key: meta[key]
        for key in ("date", "command", "host", "python", "torch", "cuda", "triton", "fla", "gpu", "driver")
        if key in meta
    }
    prov["built"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    prov["built_from"] = source
    extra = {
        "measured_at_context": measured_at,
        "context_checks": context_checks,
        "smoothed": {m: {"from_batch": b0, "how": "least-squares line through the measured points at batch >= "
                         f"{b0} (measured cost alternates between levels there)"} for m, b0 in (smooth_from or {}).items()},
        "method": "per-block pieces: k distinct decoder blocks (own weights and caches) in one CUDA graph, "
        "median of graph replays timed with CUDA events, divided by k"
        + ("; less 1/k of the step context (step_context_ms), added once per step" if step_context else ""),
    }
    return CostTable(
        **{**table_kwargs, "source": source},
        idealized=idealized,
        regression=tuple(fits),
        provenance=prov,
        extra=extra,
    )
