"""Initialising the supernet from the teacher.

- Shared tensors (embeddings, every block's two norms and MLP, final norm, LM head) are copied.
- ``attention`` and ``sliding_window`` mixers get the teacher's attention weights (the same weights: they differ
  only in the mask).
- GDN and KDA take the teacher's attention projections where the shapes correspond (the linear-attention view of
  attention: query -> q, key -> k, value -> v, output projection -> output projection). With attention of
  ``H`` query heads and ``Hkv`` KV heads of size ``dh`` (weights ``[out, in]``; "head j" = rows
  ``j*dh:(j+1)*dh``, for ``o_proj`` the columns):

  ==========================  ==============================================================================
  target                       source
  ==========================  ==============================================================================
  gdn ``in_proj_qkvz`` Q head j  ``q_proj`` head ``j * H // Hk`` (the first query head of that key group)
  gdn ``in_proj_qkvz`` K head j  ``k_proj`` head ``j * Hkv // Hk``
  gdn ``in_proj_qkvz`` V head h  ``v_proj`` head ``h * Hkv // Hv`` (value head h reads key head h // (Hv/Hk),
                                 as attention query head h reads KV head h // (H/Hkv))
  gdn ``in_proj_qkvz`` Z        kept random (no counterpart: the output gate)
  gdn ``out_proj`` head h       ``o_proj`` head ``h * H // Hv``
  kda ``q_proj`` head h         ``q_proj`` head ``h * H // Hkda``
  kda ``k_proj`` / ``v_proj`` h ``k_proj`` / ``v_proj`` head ``h * Hkv // Hkda``
  kda ``o_proj`` head h         ``o_proj`` head ``h * H // Hkda``
  ==========================  ==============================================================================

  Needs ``dk == dh`` (q, k), ``dv == dh`` (v, output); a slice whose sizes differ is left random and reported.
  The short convolutions start as the identity (tap ``K-1``, the current token, is 1; the others 0), so q, k, v
  begin as SiLU of the copied projections. Gates (``in_proj_ba``, ``f_a/f_b``, ``g_a/g_b``, ``beta_proj``), the
  decays (``A_log``, ``dt_bias``) and the output norms keep their random / unit initialisation.
"""

from __future__ import annotations

from typing import Any

import torch

from placement_search.evaluators import Supernet
from placement_search.evaluators.mixers import GDN, KDA, Attention

SHARED_MARKERS = (".mixer.",)


def is_shared(name: str) -> bool:
    """True for shared parameters (everything that is not a mixer's)."""
    return not any(m in name for m in SHARED_MARKERS)


def _rows(w: torch.Tensor, head: int, size: int) -> torch.Tensor:
    return w[head * size : (head + 1) * size]


@torch.no_grad()
def _identity_conv(weight: torch.Tensor) -> None:
    """Depthwise conv ``[C, 1, K]`` -> passes the current token through."""
    weight.zero_()
    weight[:, 0, -1] = 1.0


@torch.no_grad()
def gdn_from_attention(gdn: GDN, attn: Attention) -> list[dict[str, Any]]:
    """Copy ``attn``'s projections into ``gdn`` (see the module table). Returns one record per copied slice."""
    s, a = gdn.spec, attn.spec
    H, Hkv, dh = a.heads, a.head_groups, a.head_size
    Hk, Hv, dk, dv = s.key_heads, s.value_heads, s.key_head_dim, s.value_head_dim
    w = gdn.in_proj_qkvz.weight  # [2*Hk*dk + 2*Hv*dv, d]: [Q | K | V | Z]
    k_off, v_off = Hk * dk, 2 * Hk * dk
    done: list[dict[str, Any]] = []
    if dk == dh:
        for j in range(Hk):
            src = j * H // Hk
            w[j * dk : (j + 1) * dk] = _rows(attn.q_proj.weight, src, dh)
            done.append({"target": f"in_proj_qkvz[Q head {j}]", "source": f"q_proj[head {src}]"})
            src = j * Hkv // Hk
            w[k_off + j * dk : k_off + (j + 1) * dk] = _rows(attn.k_proj.weight, src, dh)
            done.append({"target": f"in_proj_qkvz[K head {j}]", "source": f"k_proj[head {src}]"})
    if dv == dh:
        for h in range(Hv):
            src = h * Hkv // Hv
            w[v_off + h * dv : v_off + (h + 1) * dv] = _rows(attn.v_proj.weight, src, dh)
            done.append({"target": f"in_proj_qkvz[V head {h}]", "source": f"v_proj[head {src}]"})
            src = h * H // Hv
            gdn.out_proj.weight[:, h * dv : (h + 1) * dv] = attn.o_proj.weight[:, src * dh : (src + 1) * dh]
            done.append({"target": f"out_proj[head {h}]", "source": f"o_proj[head {src}]"})
    _identity_conv(gdn.convolution.weight)
    return done


@torch.no_grad()
def kda_from_attention(kda: KDA, attn: Attention) -> list[dict[str, Any]]:
    """Copy ``attn``'s projections into ``kda`` (see the module table). Returns one record per copied slice."""
    s, a = kda.spec, attn.spec
    H, Hkv, dh = a.heads, a.head_groups, a.head_size
    done: list[dict[str, Any]] = []
    if s.head_dim == dh:
        D = s.head_dim
        for h in range(s.heads):
            q_src, kv_src = h * H // s.heads, h * Hkv // s.heads
            kda.q_proj.weight[h * D : (h + 1) * D] = _rows(attn.q_proj.weight, q_src, dh)
            kda.k_proj.weight[h * D : (h + 1) * D] = _rows(attn.k_proj.weight, kv_src, dh)
            kda.v_proj.weight[h * D : (h + 1) * D] = _rows(attn.v_proj.weight, kv_src, dh)
            kda.o_proj.weight[:, h * D : (h + 1) * D] = attn.o_proj.weight[:, q_src * dh : (q_src + 1) * dh]
            done += [
                {"target": f"q_proj[head {h}]", "source": f"q_proj[head {q_src}]"},
                {"target": f"k_proj[head {h}]", "source": f"k_proj[head {kv_src}]"},
                {"target": f"v_proj[head {h}]", "source": f"v_proj[head {kv_src}]"},
                {"target": f"o_proj[head {h}]", "source": f"o_proj[head {q_src}]"},
            ]
    for conv in (kda.q_conv, kda.k_conv, kda.v_conv):
        _identity_conv(conv.weight)
    return done


@torch.no_grad()
def init_from_teacher(student: Supernet, teacher: Supernet, teacher_mixer: str = "attention") -> dict[str, Any]:
    """Initialise ``student`` (every mixer built) from ``teacher`` (all-attention). Returns the mapping report."""
    t_params = dict(teacher.named_parameters())
    copied = []
    for name, p in student.named_parameters():
        if is_shared(name):
            p.copy_(t_params[name])
            copied.append(name)
    report: dict[str, Any] = {"shared": len(copied), "layers": []}
    for i, (sb, tb) in enumerate(zip(student.blocks, teacher.blocks, strict=True)):
        attn = tb.mixer.mixers[teacher_mixer]
        layer: dict[str, Any] = {}
        for name, mixer in sb.mixer.mixers.items():
            if isinstance(mixer, Attention):
                if mixer.spec.heads != attn.spec.heads or mixer.spec.head_groups != attn.spec.head_groups:
                    raise ValueError(f"layer {i} mixer {name!r}: attention shapes differ from the teacher's")
                mixer.load_state_dict(attn.state_dict())
                layer[name] = "copied from teacher attention"
            elif isinstance(mixer, GDN):
                layer[name] = gdn_from_attention(mixer, attn)
            elif isinstance(mixer, KDA):
                layer[name] = kda_from_attention(mixer, attn)
        report["layers"].append(layer)
    return report
