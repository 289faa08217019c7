"""RMSNorm as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dimension.

    Args:
        x: ``[..., D]`` any float dtype.
        weight: ``[D]`` or None (no affine weight).
        eps: added to the mean square.

    Returns:
        ``[..., D]`` in ``x.dtype`` (promoted with weight's dtype by the final multiply): the normalisation is
        computed in fp32 and cast back to ``x.dtype`` BEFORE multiplying by ``weight`` (Llama/Mistral/Apriel2).
        On CUDA the fp32 normalisation is torch's ``rms_norm`` (one fused kernel instead of five; same math,
        reduction order of the fused kernel); on CPU the explicit composition.
    """
    x32 = x.float()
    if x32.is_cuda:
        y = F.rms_norm(x32, (x32.shape[-1],), eps=eps)
    else:
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = y.to(x.dtype)
    if weight is None:
        return y
    return y * weight
