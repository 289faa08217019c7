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
  (``TRITON_INTERPRET=1``).
- ``"auto"``: ``"triton"`` on CUDA for bf16/fp16 with ``M <= SKINNY_MAX_ROWS``, no gradient, unit column
  strides and a weight of at least ``SKINNY_MIN_WEIGHT`` elements (checked and timed on the H200 by
  ``benchmarks/bench_projection.py``); ``"torch"`` otherwise.

All paths are CUDA-graph capturable (no host synchronisation).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import triton_available

LINEAR_OP_BACKENDS = ("auto", "torch", "triton")
#: The most activation rows the Triton kernel takes (its ``BM`` tile).
SKINNY_MAX_ROWS = 16
#: ``"auto"`` picks Triton on CUDA when True (False: the whole decode path on cuBLAS, e.g. to compare).
AUTO_CUDA_TRITON = True


def _triton_module() -> ModuleType:
    return importlib.import_module(f"{__package__}._projection_triton")


def skinny_config(n: int, k: int, gated: bool) -> dict[str, int]:
    """Tile sizes and pipeline depth for an ``[N, K]`` weight: ``BN`` output columns per program, ``BK`` per
    pipeline stage, ``STAGES`` loads in flight. Chosen from the sweep of ``benchmarks/bench_projection.py`` on the H200
    (results/projection_kernels_h200.json) at the 15B shapes, batch 1 and 16."""
    if gated:  # MLP gate + up [14336, 5120] x 2: 76.6 us (cuBLAS + SiLU + product: 83.8)
        return {"BN": 32, "BK": 128, "STAGES": 3, "num_warps": 4}
    if n >= 65536:  # LM head [131072, 5120]: 306 us (cuBLAS 378)
        return {"BN": 64, "BK": 256, "STAGES": 3, "num_warps": 4}
    if n <= 8192 and k <= 16384 and n <= k:  # output projections, MLP down [5120, 4096 / 14336]
        return {"BN": 64, "BK": 256, "STAGES": 5, "num_warps": 8}
    if n <= 8192:  # attention q/k/v packed [6144, 5120]
        return {"BN": 32, "BK": 256, "STAGES": 5, "num_warps": 4}
    return {"BN": 32, "BK": 128, "STAGES": 5, "num_warps": 4}  # GDN / KDA packed inputs [10304 / 12576, 5120]


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
    cfg = dict(config or skinny_config(n, k, w2 is not None))
    warps = cfg.pop("num_warps", 4)
    grid = (-(-n // cfg["BN"]),)
    _triton_module().skinny_linear_kernel[grid](
        x2, x2.stride(0), w, w.stride(0), w if w2 is None else w2, w.stride(0) if w2 is None else w2.stride(0),
        w if bias is None else bias, r2, r2.stride(0), out, out.stride(0), m, n, k,
        BM=SKINNY_MAX_ROWS, GATED=w2 is not None, RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BK"] == 0, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps, **cfg,
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
        config: Triton tile sizes (``BN``, ``BK``, ``STAGES``, ``num_warps``); default :func:`skinny_config`.

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

