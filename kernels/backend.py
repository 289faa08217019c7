"""Backend selection for the mixer kernels.

Rules (see docs/platform.md):

* fla (flash-linear-attention) is an optional dependency (the ``gpu`` extra). ``import fla.ops`` needs Triton even
  on CPU and its kernels fail on CPU tensors, so fla is imported lazily and only for CUDA tensors.
* ``"auto"`` picks the fastest exact path available for the tensors' device: fla on CUDA when importable,
  otherwise the pure-PyTorch chunked form; for attention, SDPA/FlexAttention on CUDA and the explicit fp32
  softmax reference on CPU.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

LINEAR_BACKENDS = ("auto", "naive", "chunk", "fla", "fla_kda")
STEP_BACKENDS = ("auto", "naive", "chunk", "fla")
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "flex")
DECODE_BACKENDS = ("auto", "reference", "sdpa", "sdpa_grouped", "triton")
#: What ``"auto"`` decode attention means on CUDA (``benchmarks/measure_decode.py --attention-decode`` sets it).
#: SDPA (cuDNN): the Triton split-K kernel comes within -0.2% (all-SWA batch 1) to +2.7% (all-attention batch 1) of
#: it on the whole 15B step (results/decode_step_ab_tattn_h200.json), not faster.
AUTO_CUDA_DECODE_BACKEND = "sdpa"
#: Programmatic dependent launch (PDL) of our Triton decode kernels on sm_90+ GPUs (see :func:`pdl_launch`). False
#: (or ``PLACEMENT_SEARCH_PDL=0``): every kernel waits for its predecessor to finish before it starts. On the H200
#: the whole 15B decode step is 0.2-1.0% faster with it (results/decode_step_ab_h200.json, ``ab_decode_step.py``).
PDL = os.environ.get("PLACEMENT_SEARCH_PDL", "1") != "0"
#: Under PDL, when each kernel lets its dependent launch: ``"exit"`` as its programs exit (no trigger), ``"enter"``
#: right after its own wait (the H200 step 6-8% slower: results/decode_step_ab_early_h200.json), ``"late"`` once its
#: programs are past their main work (a projection's K loop, a state tile's update), so that the dependent's programs
#: get onto the SMs freed by this kernel's tail and its wait overlaps that tail (``_pdl_triton.pdl_release``): on the
#: H200 ``"late"`` took 0.1-0.8% off the batch-1 step of all-SWA, all-GDN and mixed (1.0-1.2% with 4 weight lines
#: prefetched to L2 before the wait), made all-KDA's 0.6% slower, and every B = 16 step 1.3-3.0% slower
#: (results/decode_step_ab_late_h200.json), so ``"exit"`` stays.
PDL_TRIGGER = "exit"
#: The ``PDL`` constexpr of each trigger mode (``_pdl_triton``).
PDL_MODES = {"exit": 1, "enter": 2, "late": 3}
#: Backends of the decode step's projections and RMSNorm (:mod:`.projection`, :mod:`.norm`).
LINEAR_OP_BACKENDS = ("auto", "torch", "triton")
#: The most activation rows the skinny Triton projection takes (its ``BM`` tile).
SKINNY_MAX_ROWS = 16
#: ``"auto"`` picks Triton on CUDA when True (False: the whole decode path on cuBLAS, e.g. to compare).
AUTO_CUDA_TRITON = True


#: Arrival counters per device (int32 zeros) for the kernels whose last program to arrive finishes a shared piece of
#: work (the split-K projections' fixup, :mod:`.projection`): every launch leaves the counters it used at zero again
#: (its last program per piece re-arms its counter). Launches on one stream are
#: serialized (and so are a CUDA graph's kernels and its replays; under programmatic dependent launch a kernel touches
#: nothing before its predecessor has completed), so one buffer serves every launch on the device; kernels running at
#: the same time on two streams would need two buffers (none in the runtime: warm-up, capture and replays are
#: stream-ordered). Buffers are never freed: a captured graph keeps using the address it saw, so a buffer outgrown by
#: a larger call stays alive (and stays zero) behind its successor.
ARRIVAL_COUNTERS: dict[torch.device, list[Tensor]] = {}
#: Counters in a first buffer (64 KiB: the LM head's 131072 columns at BN 8), so that it is rarely outgrown.
ARRIVAL_COUNTERS_MIN = 1 << 14


def arrival_counters(device: torch.device, n: int) -> Tensor:
    """At least ``n`` zeroed int32 counters on ``device`` (see ``ARRIVAL_COUNTERS``).

    The cached buffer is allocated outside CUDA graph capture (the runtime warms every shape up eagerly first). A
    first launch needing more counters *inside* a capture gets a buffer of its own instead: ``torch.zeros`` there
    comes from the graph's pool and its memset becomes a node of the graph, which runs at each replay (so the replays
    find zeros) but not at capture time, so that buffer would hold garbage for eager launches and is not cached; the
    graph's pool keeps its memory as long as the graph lives.
    """
    bufs = ARRIVAL_COUNTERS.setdefault(device, [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    size = max(n, ARRIVAL_COUNTERS_MIN, 2 * bufs[-1].numel() if bufs else 0)
    bufs.append(torch.zeros(size, dtype=torch.int32, device=device))
    return bufs[-1]


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it does on CPU machines too; its kernels then need the interpreter)."""
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


@functools.cache
def fla_available() -> bool:
    """True when ``fla.ops`` imports (needs triton). Never call this for CPU-only work."""
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
        importlib.import_module("fla.ops.kda")
    except Exception:
        return False
    return True


@functools.cache
def _pdl_capable(index: int) -> bool:
    if not triton_available():
        return False
    try:
        importlib.import_module("triton.language.extra.cuda").gdc_wait  # noqa: B018 (Triton >= 3.4)
    except Exception:
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0)


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's multiprocessors; 132 (the H200's) off CUDA, so that interpreter runs choose what the H200 would."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def pdl_launch(device: torch.device) -> dict[str, int | bool]:
    """Launch keywords for one of our Triton kernels on ``device``: ``{"PDL": mode, "launch_pdl": True}`` (the
    mode of ``PDL_TRIGGER``: 1 for ``"exit"``) where programmatic dependent launch applies (``PDL`` on, a CUDA
    device of compute capability 9.0 or more, a Triton with grid dependency control, not the interpreter), ``{}``
    otherwise.

    Under PDL a kernel may start while its predecessor on the stream is still running (its tail wave), so its
    programs get onto the SMs and run their prologue early. Each such kernel takes the ``PDL`` constexpr and calls
    ``_pdl_triton.pdl_enter`` (PTX ``griddepcontrol.wait``: the predecessor has completed and its writes are
    visible) in every program before it reads anything a predecessor wrote or writes anything. Since every program
    waits, a kernel's completion still implies its predecessors' completion: stream order holds transitively, also
    for kernels that are not ours (they launch normally). Captured CUDA graphs keep the programmatic edges.
    """
    if not PDL or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if PDL_TRIGGER not in PDL_MODES:
        raise ValueError(f"kernels.backend.PDL_TRIGGER = {PDL_TRIGGER!r}: expected one of {sorted(PDL_MODES)}")
    return {"PDL": PDL_MODES[PDL_TRIGGER], "launch_pdl": True} if _pdl_capable(index) else {}


def fla_module(name: str) -> ModuleType:
    """Import ``fla.ops.<name>`` lazily (only ever called on the CUDA path)."""
    return importlib.import_module(f"fla.ops.{name}")


def _check(backend: str, allowed: tuple[str, ...], what: str) -> None:
    if backend not in allowed:
        raise ValueError(f"unknown {what} backend {backend!r}; expected one of {allowed}")


def resolve_linear_backend(backend: str, device: torch.device) -> str:
    """Resolve a gated-delta-rule / KDA prefill backend to ``"naive"``, ``"chunk"``, ``"fla"`` or ``"fla_kda"``
    (the gated delta rule through fla's KDA kernels; for KDA itself it means ``"fla"``)."""
    _check(backend, LINEAR_BACKENDS, "linear-attention")
    if backend == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "chunk"
    if backend in ("fla", "fla_kda"):
        if device.type != "cuda":
            raise ValueError(f"backend {backend!r} needs CUDA tensors (fla's Triton kernels fail on CPU)")
        if not fla_available():
            raise ImportError(f"backend {backend!r} needs fla-core (pip install 'placement-search[gpu]')")
    return backend


def resolve_step_backend(backend: str, device: torch.device) -> str:
    """Resolve a decode-step backend to ``"torch"`` or ``"fla"`` (``naive``/``chunk`` both mean torch)."""
    _check(backend, STEP_BACKENDS, "decode-step")
    resolved = resolve_linear_backend(backend, device)
    return "fla" if resolved == "fla" else "torch"


def resolve_attention_backend(backend: str, device: torch.device, *, windowed: bool) -> str:
    """Resolve a prefill attention backend to ``"reference"``, ``"sdpa"`` or ``"flex"``.

    ``auto``: CPU -> reference; CUDA -> SDPA (cuDNN first) for full causal, FlexAttention for a window.
    """
    _check(backend, ATTENTION_BACKENDS, "attention")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        return "flex" if windowed else "sdpa"
    if backend == "flex" and device.type != "cuda":
        raise ValueError("backend 'flex' is only used on CUDA here; use 'reference' or 'sdpa' on CPU")
    return backend


def resolve_decode_backend(backend: str, device: torch.device) -> str:
    """Resolve a decode attention backend to ``"reference"``, ``"sdpa"``, ``"sdpa_grouped"`` or ``"triton"``
    (split-K Triton kernel; on CPU tensors only in Triton's interpreter, ``TRITON_INTERPRET=1``)."""
    _check(backend, DECODE_BACKENDS, "decode attention")
    if backend == "auto":
        return AUTO_CUDA_DECODE_BACKEND if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("decode backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return backend


def uses_triton(x: Tensor, weights: tuple[Tensor, ...] | list[Tensor], backend: str = "auto") -> bool:
    """Whether the skinny Triton projection (and the Triton RMSNorm) takes these tensors under ``backend`` (under
    ``"auto"``, :func:`.projection.linear` and :func:`.projection.gated_linear` also leave weights under
    ``SKINNY_MIN_WEIGHT`` elements to cuBLAS); raises for a ``"triton"`` request it cannot serve."""
    if backend not in LINEAR_OP_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; expected one of {LINEAR_OP_BACKENDS}")
    if backend == "torch":
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend 'triton' needs triton (pip install 'placement-search[gpu]')")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("linear backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        if rows > SKINNY_MAX_ROWS:
            raise ValueError(f"linear backend 'triton' takes at most {SKINNY_MAX_ROWS} rows, got {rows}")
        return True
    return (
        AUTO_CUDA_TRITON
        and x.device.type == "cuda"
        and 0 < rows <= SKINNY_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and all(w.dtype == x.dtype and w.stride(-1) == 1 for w in weights)
        and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
        and triton_available()
    )
