"""placement_search.kernels: the mixer math of Super Apriel as pure functions on tensors.

Every op has a pure-PyTorch path (the CPU reference) and a GPU path (SDPA / FlexAttention, fla's Triton
kernels, and our own Triton kernels in the ``_*_triton`` modules: the prefill conv, the fused GDN/KDA decode
steps, decode attention, and the decode step's projections, RMSNorm and RoPE + cache write; each is also run on CPU
tensors by the tests in Triton's interpreter). Layout is ``[B, T, H, D]`` throughout; recurrent states are fp32
``[B, H, DK, DV]``. fla is optional and only imported for CUDA tensors (see :mod:`.backend`).
"""

from .attention import attention, attention_decode, causal_window_mask, decode_bias, decode_lengths
from .backend import fla_available
from .conv import causal_conv1d, causal_conv1d_update
from .delta_rule import (
    chunk_delta_rule,
    delta_rule_step_torch,
    gated_delta_rule,
    gated_delta_rule_step,
    gdn_as_kda,
    gdn_gate,
    l2norm,
    naive_delta_rule,
)
from .fused_decode import gdn_decode_step, kda_decode_step
from .kda import kda, kda_gate, kda_step
from .norm import rms_norm
from .projection import (
    SKINNY_MIN_WEIGHT,
    NormedRows,
    gated_linear,
    linear,
    linear_pair,
    linear_rope_cache,
    plain_rows,
    rope_fits,
)
from .projection import uses_triton as linear_uses_triton
from .rope import apply_rope, apply_rope_tables, rope_cache_write, rope_cos_sin, rope_step_tables, rotate_half

__all__ = [
    "SKINNY_MIN_WEIGHT",
    "NormedRows",
    "apply_rope",
    "apply_rope_tables",
    "attention",
    "attention_decode",
    "causal_conv1d",
    "causal_conv1d_update",
    "causal_window_mask",
    "chunk_delta_rule",
    "decode_bias",
    "decode_lengths",
    "delta_rule_step_torch",
    "fla_available",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gated_linear",
    "gdn_as_kda",
    "gdn_decode_step",
    "gdn_gate",
    "kda",
    "kda_decode_step",
    "kda_gate",
    "kda_step",
    "l2norm",
    "linear",
    "linear_pair",
    "linear_rope_cache",
    "linear_uses_triton",
    "naive_delta_rule",
    "plain_rows",
    "rms_norm",
    "rope_cache_write",
    "rope_cos_sin",
    "rope_fits",
    "rope_step_tables",
    "rotate_half",
]
