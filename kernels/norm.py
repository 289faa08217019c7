"""RMSNorm as a pure function."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import pdl_launch, uses_triton


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, *, backend: str = "auto") -> Tensor:
    """RMSNorm over the last dimension.

    Args:
        x: ``[..., D]`` any float dtype.
        weight: ``[D]`` or None (no affine weight).
        eps: added to the mean square.
        backend: ``"torch"``; ``"triton"`` (one launch: :func:`._projection_triton.rms_norm_kernel`; needs a weight
            of ``x``'s dtype); ``"auto"``: Triton on CUDA for decode-sized inputs (at most
            ``SKINNY_MAX_ROWS`` rows, bf16/fp16, weight of the same dtype, no gradient), torch
            otherwise, so prefill and training keep the torch path.

    Returns:
        ``[..., D]`` in ``x.dtype`` (promoted with weight's dtype by the final multiply): the normalisation is
        computed in fp32 and cast back to ``x.dtype`` BEFORE multiplying by ``weight`` (Llama/Mistral/Apriel2).
        On CUDA the fp32 normalisation is torch's ``rms_norm`` (one fused kernel instead of five; same math,
        reduction order of the fused kernel); on CPU the explicit composition.
    """
    if weight is not None and weight.dtype == x.dtype and uses_triton(x, (weight,), backend):
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty_like(x2)
        bd = 1 << max(d - 1, 0).bit_length()
        importlib.import_module(f"{__package__}._projection_triton").rms_norm_kernel[(x2.shape[0],)](
            x2, x2.stride(0), weight, out, out.stride(0), d, float(eps), BD=bd, num_warps=8 if bd >= 4096 else 4,
            **pdl_launch(x.device),
        )
        return out.view(x.shape)
    if backend == "triton":
        raise ValueError("rms_norm backend 'triton' needs a weight of the input's dtype")
    x32 = x.float()
    if x32.is_cuda:
        y = F.rms_norm(x32, (x32.shape[-1],), eps=eps)
    else:
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = y.to(x.dtype)
    if weight is None:
        return y
    return y * weight

