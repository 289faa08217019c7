"""Linear projections of a decode step: ``x @ W^T`` for a few rows, with the epilogues a block needs.

Ops (pure functions on tensors; ``W`` is ``[N, K]`` as in the checkpoint, ``x`` is ``[..., K]`` and the leading
dimensions hold ``M`` rows in all):

- :func:`linear`: ``x W^T (+ b)``, or ``residual + (x W^T + b)`` with ``residual [..., N]``.
- :func:`gated_linear`: ``silu(x Wg^T) * (x Wu^T)`` (the gated MLP's gate and up projections).

Backends:

- ``"torch"``: ``F.linear`` (cuBLAS on CUDA) and the torch ops for the epilogue, each rounded to the activation
  dtype; the reference and the CPU path.
- ``"triton"``: :func:`._projection_triton.skinny_linear_kernel`, one launch per call streaming the weight(s) once
  with the epilogue fused. For ``M <= 16`` rows (decode batches); on CPU tensors only under Triton's interpreter
  (``TRITON_INTERPRET=1``). Optionally split-K (config ``SPLIT > 1``, or ``0`` for :func:`split_for`): each
  column block's K is split over ``SPLIT`` programs, so that a weight of few column blocks still fills whole
  waves of the GPU's SMs (``N = 5120`` at ``BN = 64`` is 80 programs on the H200's 132); the last program of a
  block to arrive sums the fp32 partials (a per-call workspace) in a fixed order and applies the epilogue, with
  a per-device counter buffer (``_SPLIT_LOCKS``) that every launch leaves at zero. Deterministic; it differs from
  ``SPLIT = 1`` by the fp32 summation order only. On sm_90+ GPUs launched with programmatic dependent launch
  (:func:`.backend.pdl_launch`): a launch may start as the previous kernel's programs exit, and waits for it
  before it reads the activation.
- ``"auto"``: ``"triton"`` on CUDA for bf16/fp16 with ``M <= SKINNY_MAX_ROWS``, no gradient, unit column
  strides and a weight of at least ``SKINNY_MIN_WEIGHT`` elements (checked and timed on the H200 by
  ``benchmarks/bench_projection.py``); ``"torch"`` otherwise.

All paths are CUDA-graph capturable (no host synchronisation).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import pdl_launch, triton_available

LINEAR_OP_BACKENDS = ("auto", "torch", "triton")
#: The most activation rows the Triton kernel takes (its ``BM`` tile).
SKINNY_MAX_ROWS = 16
#: ``"auto"`` picks Triton on CUDA when True (False: the whole decode path on cuBLAS, e.g. to compare).
AUTO_CUDA_TRITON = True


def _triton_module() -> ModuleType:
    return importlib.import_module(f"{__package__}._projection_triton")


#: When set, replaces every default config's ``SPLIT`` (0: :func:`split_for`); for benchmarks comparing split-K
#: settings on the whole decode step (``benchmarks/profile_decode_step.py --split``).
SPLIT_OVERRIDE: int | None = None


#: Under programmatic dependent launch (:func:`.backend.pdl_launch`): 128-byte lines of each weight row of a program
#: (the start of its K range) that it asks L2 for before it waits for the previous kernel, so that the weight
#: stream would start during that kernel's tail (0: none; a power of two). Off: on the H200 every prefetch made the
#: whole step slower (all-SWA batch 1: 8.21 ms without, 8.26 with 4 lines, 8.34 with 8;
#: results/decode_step_ab_h200.json), the lines being fetched again by the main loop.
PDL_PREFETCH_LINES = 0


#: Split-K tiles for the output projections and the MLP down projection ([5120, 4096 / 14336]): 32 x 128 tiles, 4
#: stages, 2 K ranges. The split-K sweep (results/projection_splitk_h200.json, 2026-11-29) timed them at 41.9 / 42.3
#: us (MLP down, batch 1 / 16) against 44.4 / 44.8 with the unsplit 64 x 256 tiles, o_proj 15.1 / 15.7 against
#: 16.8 / 16.7; the whole 15B step 1.0-1.5% faster (results/decode_step_profile_splitk_h200.json). False: the
#: unsplit tiles (to compare).
SPLIT_K_OUTPUT_PROJECTIONS = True


def skinny_config(n: int, k: int, gated: bool) -> dict[str, int]:
    """Tile sizes and pipeline depth for an ``[N, K]`` weight: ``BN`` output columns per program, ``BK`` per
    pipeline stage, ``STAGES`` loads in flight, ``SPLIT`` K ranges per column block (1: no split-K; 0: chosen by
    :func:`split_for` for the device's SM count). Chosen from the sweeps of ``benchmarks/bench_projection.py`` on the
    H200 (results/projection_kernels_h200.json; split-K: results/projection_splitk_h200.json) at the 15B shapes,
    batch 1 and 16. ``SPLIT_OVERRIDE`` and ``SPLIT_K_OUTPUT_PROJECTIONS`` change the defaults (benchmarks)."""
    cfg = _skinny_config(n, k, gated)
    if SPLIT_OVERRIDE is not None:
        cfg["SPLIT"] = SPLIT_OVERRIDE
    return cfg


def _skinny_config(n: int, k: int, gated: bool) -> dict[str, int]:
    if gated:  # MLP gate + up [14336, 5120] x 2: 76.6 us (cuBLAS + SiLU + product: 83.8)
        return {"BN": 32, "BK": 128, "STAGES": 3, "num_warps": 4, "SPLIT": 1}
    if n >= 65536:  # LM head [131072, 5120]: 306 us (cuBLAS 378)
        return {"BN": 64, "BK": 256, "STAGES": 3, "num_warps": 4, "SPLIT": 1}
    if n <= 8192 and k <= 16384 and n <= k:  # output projections, MLP down [5120, 4096 / 14336]
        if SPLIT_K_OUTPUT_PROJECTIONS:
            return {"BN": 32, "BK": 128, "STAGES": 4, "num_warps": 4, "SPLIT": 2}
        return {"BN": 64, "BK": 256, "STAGES": 5, "num_warps": 8, "SPLIT": 1}
    if n <= 8192:  # attention q/k/v packed [6144, 5120]
        return {"BN": 32, "BK": 256, "STAGES": 5, "num_warps": 4, "SPLIT": 1}
    # GDN / KDA packed inputs [10304 / 12576, 5120]
    return {"BN": 32, "BK": 128, "STAGES": 5, "num_warps": 4, "SPLIT": 1}


def split_for(n: int, k: int, bn: int, sms: int = 132, *, bk: int = 1, min_k: int = 1024) -> int:
    """A split-K factor for ``cdiv(n, bn)`` column blocks over ``k``: the smallest ``SPLIT`` whose
    ``cdiv(n, bn) * SPLIT`` programs are at least two waves of ``sms`` and fill at least 90% of their last
    wave (the best-filled such count if none reaches 90%), with every split at least ``min_k`` of K and, given the
    kernel's ``bk``, none left empty by the rounding of the splits to whole ``bk`` steps; where no split reaches two
    waves, the largest allowed. On the H200 (132 SMs): ``n = 5120, k = 4096, bn = 64`` (80 blocks) gives 4 (320
    programs, the only count of two waves), ``n = 5120, k = 14336, bn = 64`` gives 6 (480 programs: 3.6 waves, 91%),
    ``n = 10240, k = 5120, bn = 32`` gives 2 (640: 4.85 waves, 97%), the LM head's 2048 blocks of 64 keep 1."""

    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    blocks = cdiv(n, bn)
    cands: list[tuple[int, int, float]] = []  # (split, programs, fill of the waves)
    for split in range(1, max(1, k // min_k) + 1):
        chunk = cdiv(cdiv(k, split), bk) * bk  # as the kernel splits
        if split > 1 and (split - 1) * chunk >= k:  # the last split would be empty
            continue
        programs = blocks * split
        cands.append((split, programs, programs / (cdiv(programs, sms) * sms)))
    enough = [c for c in cands if c[1] >= 2 * sms]
    if not enough:
        return cands[-1][0]
    good = [c for c in enough if c[2] >= 0.9]
    if good:
        return good[0][0]
    return max(enough, key=lambda c: (c[2], -c[0]))[0]


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: the H200's count, so CPU runs pick what the H200 would
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Split-K arrival counters per device: int32 zeros, one per column block, that every split-K launch leaves at zero
#: again (its last program per block re-arms its counter). Launches on one stream are serialized (and so are a CUDA
#: graph's kernels and its replays), so one buffer serves every launch on the device; launches of split-K kernels
#: running at the same time on two streams would need two buffers (none in the runtime: warm-up, capture and
#: replays are stream-ordered). Buffers are never freed: a captured graph keeps using the address it saw, so a
#: buffer outgrown by a larger call stays alive (and stays zero) behind its successor.
_SPLIT_LOCKS: dict[torch.device, list[Tensor]] = {}
#: Counters in a first buffer (64 KiB: the LM head's 131072 columns at BN 8), so that it is rarely outgrown.
_SPLIT_LOCKS_MIN = 1 << 14


def _split_locks(device: torch.device, blocks: int) -> Tensor:
    """Zeroed counters for ``blocks`` column blocks on ``device`` (see ``_SPLIT_LOCKS``).

    The cached buffer is allocated outside CUDA graph capture (the runtime warms every shape up eagerly first). A
    first split-K launch *inside* a capture gets a buffer of its own instead: ``torch.zeros`` there comes from the
    graph's pool and its memset becomes a node of the graph, which runs at each replay (so the replays find zeros)
    but not at capture time, so that buffer would hold garbage for eager launches and is not cached; the graph's
    pool keeps its memory as long as the graph lives.
    """
    bufs = _SPLIT_LOCKS.setdefault(device, [])
    if bufs and bufs[-1].numel() >= blocks:
        return bufs[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(blocks, dtype=torch.int32, device=device)
    size = max(blocks, _SPLIT_LOCKS_MIN, 2 * bufs[-1].numel() if bufs else 0)
    bufs.append(torch.zeros(size, dtype=torch.int32, device=device))
    return bufs[-1]


#: ``"auto"`` leaves weights smaller than this (elements) to cuBLAS: a 1-8 MB read is launch-bound, where cuBLAS's
#: split-K kernels beat one program per column block (k/v_proj [1024, 5120]: 8.3 us vs 12.0).
SKINNY_MIN_WEIGHT = 1 << 22


def uses_triton(x: Tensor, weights: tuple[Tensor, ...] | list[Tensor], backend: str = "auto") -> bool:
    """Whether the Triton kernel takes these tensors under ``backend`` (under ``"auto"``, :func:`linear` and
    :func:`gated_linear` also leave weights under ``SKINNY_MIN_WEIGHT`` elements to cuBLAS); raises for a
    ``"triton"`` request it cannot serve."""
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


def _launch(
    x: Tensor,
    w: Tensor,
    w2: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    config: dict[str, int] | None,
) -> Tensor:
    n, k = w.shape
    w, w2, bias = (None if t is None else t if t.stride(-1) == 1 else t.contiguous() for t in (w, w2, bias))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r2 = out
    if residual is not None:
        r2 = residual.reshape(m, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    gated = w2 is not None
    cfg = dict(config or skinny_config(n, k, gated))
    warps = cfg.pop("num_warps", 4)
    split = int(cfg.pop("SPLIT", 1))
    if split < 0:
        raise ValueError(f"SPLIT must be >= 0 (0: automatic), got {split}")
    if split == 0:
        split = split_for(n, k, cfg["BN"], _sm_count(x.device), bk=cfg["BK"])
    blocks = -(-n // cfg["BN"])
    ws = locks = out  # SPLIT = 1 reads neither (the kernel still takes a pointer for each)
    if split > 1:  # fp32 partial products (from the graph's pool under capture) and the per-block counters
        ws_shape = (split, blocks, 2 if gated else 1, m, cfg["BN"])
        ws = torch.empty(ws_shape, dtype=torch.float32, device=x.device)
        locks = _split_locks(x.device, blocks)
    pdl = pdl_launch(x.device)
    if pdl and PDL_PREFETCH_LINES:
        pdl["PREFETCH"] = PDL_PREFETCH_LINES
    _triton_module().skinny_linear_kernel[(blocks, split)](
        x2, x2.stride(0), w, w.stride(0), w if w2 is None else w2, w.stride(0) if w2 is None else w2.stride(0),
        w if bias is None else bias, r2, r2.stride(0), out, out.stride(0), ws, locks, m, n, k,
        BM=SKINNY_MAX_ROWS, SPLIT=split, GATED=gated, RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BK"] == 0, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps, **cfg, **pdl,
    )  # fmt: skip
    return out.view(*lead, n)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    residual: Tensor | None = None,
    backend: str = "auto",
    config: dict[str, int] | None = None,
) -> Tensor:
    """``x W^T`` (``+ residual``).

    Args:
        x: ``[..., K]`` activations (``M`` rows in all).
        weight: ``[N, K]``.
        bias: optional ``[N]``, added before the rounding (as ``F.linear``).
        residual: optional ``[..., N]``, added after the product is rounded to the activation dtype.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring).
        config: Triton tile sizes (``BN``, ``BK``, ``STAGES``, ``num_warps``, optional ``SPLIT``: K ranges per
            column block, 1 when absent, 0 for :func:`split_for`'s choice); default :func:`skinny_config`.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    ws = (weight,) if bias is None else (weight, bias)
    if uses_triton(x, ws, backend) and (backend == "triton" or weight.numel() >= SKINNY_MIN_WEIGHT):
        return _launch(x, weight, None, bias, residual, config)
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def gated_linear(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    *,
    backend: str = "auto",
    config: dict[str, int] | None = None,
) -> Tensor:
    """``silu(x Wg^T) * (x Wu^T)``.

    Args:
        x: ``[..., K]``.
        gate_weight, up_weight: ``[N, K]`` each.
        backend, config: as for :func:`linear`.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    if gate_weight.shape != up_weight.shape:
        raise ValueError(f"gate weight {tuple(gate_weight.shape)} and up weight {tuple(up_weight.shape)} differ")
    if uses_triton(x, (gate_weight, up_weight), backend) and (
        backend == "triton" or gate_weight.numel() >= SKINNY_MIN_WEIGHT
    ):
        return _launch(x, gate_weight, up_weight, None, None, config)
    return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)
