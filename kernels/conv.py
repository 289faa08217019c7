"""Depthwise causal 1-D convolution (GDN / KDA short convolutions), prefill and one-step decode.

Prefill backends (``causal_conv1d(..., backend=)``):

- ``"torch"``: transpose + fp32 copy, ``cat`` with the state, depthwise ``conv1d``, SiLU, cast back; the reference
  and the CPU path.
- ``"triton"``: one launch (:mod:`._conv_triton`) reading the ``[B, T, C]`` input in place and writing the output in
  its dtype, with the torch path's arithmetic in the same order: bitwise equal on CUDA
  (``benchmarks/check_gpu_kernels.py``). On CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``).
- ``"auto"``: ``"triton"`` on CUDA for fp32/bf16/fp16 when triton imports and no gradient is needed (the kernel has
  no backward: training takes the torch path), else ``"torch"``.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import triton_available

CONV_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_conv_backend(backend: str, x: Tensor, weight: Tensor) -> str:
    """Resolve a prefill conv backend for ``x`` and ``weight`` to ``"torch"`` or ``"triton"``."""
    if backend not in CONV_BACKENDS:
        raise ValueError(f"unknown conv backend {backend!r}; expected one of {CONV_BACKENDS}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if backend == "auto":
        ok = x.is_cuda and x.dtype in _TRITON_DTYPES and not needs_grad and triton_available()
        return "triton" if ok else "torch"
    if backend == "triton" and needs_grad:
        raise ValueError("conv backend 'triton' has no backward; use 'torch' where gradients are needed")
    if backend == "triton":
        if not triton_available():
            raise ImportError("conv backend 'triton' needs triton (pip install 'placement-search[gpu]')")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("conv backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        if x.dtype not in _TRITON_DTYPES:
            raise ValueError(f"conv backend 'triton' takes fp32/bf16/fp16, got {x.dtype}")
    return backend


def _check_activation(activation: str | None) -> None:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"unsupported activation {activation!r} (expected 'silu' or None)")


def _activate(y: Tensor, activation: str | None) -> Tensor:
    _check_activation(activation)
    return y if activation is None else F.silu(y)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    *,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
    output_final_state: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Depthwise causal conv, no bias, left padding ``K-1`` taken from ``initial_state`` (zeros when None).

    ``y[b, t, c] = act(sum_i weight[c, i] * xpad[b, t + i, c])`` with ``xpad = cat(initial_state, x)`` along time.

    Args:
        x: ``[B, T, C]``.
        weight: ``[C, K]`` (the checkpoint's ``[C, 1, K]`` squeezed).
        initial_state: ``[B, C, K-1]`` (the previous K-1 inputs, oldest first) or None.
        activation: ``"silu"`` or None.
        output_final_state: False returns None for the final state (scoring needs no cache).
        backend: see the module docstring.

    Returns:
        ``(y [B, T, C] in x.dtype, final_state [B, C, K-1] in x.dtype or None)``; ``final_state`` holds the last
        K-1 inputs (coming partly from ``initial_state`` when T < K-1), ready for :func:`causal_conv1d_update`.
        Accumulation is in fp32 (float64 inputs stay float64).
    """
    B, T, C = x.shape
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    Cw, K = weight.shape
    if Cw != C:
        raise ValueError(f"weight has {Cw} channels, x has {C}")
    if initial_state is not None and initial_state.shape != (B, C, K - 1):
        raise ValueError(f"initial_state must be {(B, C, K - 1)}, got {tuple(initial_state.shape)}")
    _check_activation(activation)
    if resolve_conv_backend(backend, x, weight) == "triton":
        y = _causal_conv1d_triton(x, weight, initial_state, activation)
        if not output_final_state:
            return y, None
        tail = x[:, max(T - (K - 1), 0) :].transpose(1, 2)  # [B, C, min(T, K-1)]
        if T < K - 1:
            head = initial_state if initial_state is not None else x.new_zeros(B, C, K - 1)
            tail = torch.cat((head.to(x.dtype), tail), dim=-1)[:, :, T:]
        return y, tail.contiguous()
    cdt = torch.promote_types(x.dtype, torch.float32)
    xt = x.transpose(1, 2).to(cdt)  # [B, C, T]
    pad = xt.new_zeros(B, C, K - 1) if initial_state is None else initial_state.to(cdt)
    full = torch.cat((pad, xt), dim=-1)  # [B, C, T+K-1]
    y = F.conv1d(full, weight.to(cdt)[:, None, :], groups=C)  # [B, C, T]
    y = _activate(y, activation).transpose(1, 2).to(x.dtype).contiguous()
    if not output_final_state:
        return y, None
    final_state = full[:, :, full.shape[-1] - (K - 1) :].to(x.dtype).contiguous()
    return y, final_state


def _causal_conv1d_triton(x: Tensor, weight: Tensor, initial_state: Tensor | None, activation: str | None) -> Tensor:
    """One Triton launch; ``x [B, T, C]`` may be row-strided (a slice of a wider projection)."""
    tk = importlib.import_module(f"{__package__}._conv_triton")
    B, T, C = x.shape
    K = weight.shape[1]
    if x.stride(2) != 1:
        x = x.contiguous()
    y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    st = initial_state if initial_state is not None else y  # never read without HAS_STATE
    BT, BC = 32, 64
    grid = (-(-T // BT), -(-C // BC), B)
    tk.causal_conv1d_fwd_kernel[grid](
        x, x.stride(0), x.stride(1),
        st, st.stride(0), st.stride(1), st.stride(2) if st.dim() == 3 else 0,
        weight, weight.stride(0), weight.stride(1),
        y, y.stride(0), y.stride(1),
        T, C,
        KW=K, BT=BT, BC=BC, HAS_STATE=initial_state is not None, SILU=activation is not None, DTYPE=tk.TL_DTYPES[x.dtype],
        LIBDEVICE=os.environ.get("TRITON_INTERPRET") != "1",
        num_warps=4,
    )  # fmt: skip
    return y


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    *,
    activation: str | None = "silu",
) -> Tensor:
    """One decode step of :func:`causal_conv1d`; updates ``conv_state`` IN PLACE (shift left, append ``x``).

    Static shapes, no host sync, no data-dependent branching: CUDA-graph capturable.

    Args:
        x: ``[B, C]`` the new input.
        conv_state: ``[B, C, K-1]`` previous K-1 inputs, oldest first; overwritten in place.
        weight: ``[C, K]``.
        activation: ``"silu"`` or None.

    Returns:
        ``y [B, C]`` in x.dtype (fp32 accumulation).
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    cdt = torch.promote_types(x.dtype, torch.float32)
    window = torch.cat((conv_state.to(cdt), x.to(cdt)[:, :, None]), dim=-1)  # [B, C, K]
    y = (window * weight.to(cdt)).sum(dim=-1)
    conv_state.copy_(window[:, :, 1:])
    return _activate(y, activation).to(x.dtype)
