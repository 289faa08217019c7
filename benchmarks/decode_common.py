"""What the decode benchmarks share: the raw-measurements file name, the tiny CPU smoke-test model, and the
decode kernels measured alone (GPU).

``measure_decode.py`` measures (and builds the cost table and both analyses from its raw JSON);
``engine_efficiency.py`` and ``cost_model_accuracy.py`` analyse that JSON. All three import this module and none
imports another's analysis, so the scripts' imports point one way (their ``--measure`` runs
``measure_decode.py`` as a process).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from placement_search.spec import ModelSpec, get_spec

HERE = Path(__file__).resolve().parent
RAW_NAME = "decode_measurements_h200.json"


def tiny_spec() -> ModelSpec:
    """The 15B config scaled down (hidden 64, 6 layers, window 8) for CPU smoke tests."""
    cfg = copy.deepcopy(dict(get_spec("super-apriel-15b").config))
    cfg.update(hidden_size=64, vocab_size=128)
    dec = cfg["decoder"]
    dec["num_blocks"] = 6
    block = dec["block"]
    block["mlp"]["intermediate_size"] = 96
    mixers = block["mixer"]["mixers"]
    for name in ("attention", "sliding_window"):
        mixers[name].update(heads=4, head_groups=2, head_size=16)
    mixers["sliding_window"]["window_size"] = 8
    mixers["gdn"].update(value_heads=4, key_heads=2, key_head_dim=16, value_head_dim=16)
    mixers["kda"].update(heads=4, head_dim=16)
    return ModelSpec.from_config(cfg, name="tiny-apriel")


def measure_kernels(
    spec: ModelSpec, device: Any, batches: tuple[int, ...] = (16, 256, 1024), log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """fla's delta-rule decode kernels alone in CUDA graphs, the baseline of the runtime's fused decode kernels
    (``benchmarks/bench_decode_kernels.py`` times those): the GDN step through fla's public fused-recurrent call
    (fresh state + copy back; and an in-place call of the same Triton kernel, checked against it), the KDA step
    (fla, in place); and attention decode at 32K (the runtime's SDPA with a validity mask, and SDPA without a
    mask). Essential bytes: states read and written once (attention: the cache read once), inputs and outputs.
    """
    import importlib

    import torch
    import triton

    from placement_search import kernels as K
    from placement_search.evaluators.throughput import CapturedStep, free_memory

    gdn = next(layer.mixers[m] for layer in spec.layers for m in layer.mixers if layer.mixers[m].kind == "gdn")
    kda = next(layer.mixers[m] for layer in spec.layers for m in layer.mixers if layer.mixers[m].kind == "kda")
    att = spec.mixer(0, spec.mixer_names[0])
    fr = importlib.import_module("fla.ops.gated_delta_rule.fused_recurrent")
    rows: list[dict[str, Any]] = []
    g = torch.Generator(device=device).manual_seed(3)
    bf = torch.bfloat16

    def timed(name: str, fn: Callable[[], Any], nbytes: int, batch: int, **extra: Any) -> None:
        cap = CapturedStep(fn, device)
        t = cap.time(20, budget_s=0.3)
        cap.close()
        rows.append({"kernel": name, "batch": batch, "us": t.ms * 1e3, "bytes": nbytes,
                     "gbps": nbytes / (t.ms / 1e3) / 1e9, **extra})
        log(f"kernel {name:>52} B={batch:>5}: {t.ms * 1e3:9.1f} us, {rows[-1]['gbps']:7.0f} GB/s")

    def gdn_inplace(q, k, v, gg, beta, state, scale):  # type: ignore[no-untyped-def]
        b, t, h, dk = k.shape
        hv, dv = v.shape[2], v.shape[3]
        bk, bv = triton.next_power_of_2(dk), min(8, triton.next_power_of_2(dv))
        o = torch.empty_like(v)
        fr.fused_recurrent_gated_delta_rule_fwd_kernel[(triton.cdiv(dv, bv) * b * hv,)](
            q=q, k=k, v=v, g=gg, gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=o, h0=state, ht=state,
            cu_seqlens=None, scale=scale, T=t, H=h, HV=hv, K=dk, V=dv, BK=bk, BV=bv,
            IS_BETA_HEADWISE=beta.ndim != v.ndim, USE_QK_L2NORM_IN_KERNEL=True, APPLY_BETA_SIGMOID=False,
            ALLOW_NEG_EIGVAL=False, STATE_V_FIRST=False, num_warps=1, num_stages=3,
        )  # fmt: skip
        return o

    hk, hv, dk, dv = gdn.key_heads, gdn.value_heads, gdn.key_head_dim, gdn.value_head_dim
    hq, hkv, dh = att.heads, att.head_groups, att.head_size
    for b in batches:
        q = torch.randn(b, hk, dk, device=device, dtype=bf, generator=g)
        k = torch.randn(b, hk, dk, device=device, dtype=bf, generator=g)
        v = torch.randn(b, hv, dv, device=device, dtype=bf, generator=g)
        gg = -torch.rand(b, hv, device=device, generator=g) * 0.1
        beta = torch.rand(b, hv, device=device, dtype=bf, generator=g)
        state = torch.randn(b, hv, dk, dv, device=device, generator=g) * 0.02
        io = (q.nbytes + k.nbytes + v.nbytes * 2 + gg.nbytes + beta.nbytes)
        essential = 2 * state.nbytes + io
        # correctness of the in-place call against the runtime path, on the same inputs
        s_ref, s_new = state.clone(), state.clone()
        o_ref = K.gated_delta_rule_step(q, k, v, gg, beta, s_ref, use_qk_l2norm=True)
        o_new = gdn_inplace(q[:, None], k[:, None], v[:, None], gg[:, None], beta[:, None], s_new, dk**-0.5)[:, 0]
        err_o = float((o_new.float() - o_ref.float()).norm() / o_ref.float().norm())
        err_s = float((s_new - s_ref).norm() / s_ref.norm())
        timed("gdn delta rule (fla fused_recurrent: new state + copy)",
              lambda q=q, k=k, v=v, gg=gg, beta=beta, state=state: K.gated_delta_rule_step(
                  q, k, v, gg, beta, state, use_qk_l2norm=True), essential, b)
        timed("gdn delta rule (fla kernel, state in place)",
              lambda q=q, k=k, v=v, gg=gg, beta=beta, state=state: gdn_inplace(
                  q[:, None], k[:, None], v[:, None], gg[:, None], beta[:, None], state, dk**-0.5),
              essential, b, rel_err_o=err_o, rel_err_state=err_s)
        del q, k, v, gg, beta, state, s_ref, s_new
        h, d = kda.heads, kda.head_dim
        q = torch.randn(b, h, d, device=device, dtype=bf, generator=g)
        k = torch.randn(b, h, d, device=device, dtype=bf, generator=g)
        v = torch.randn(b, h, d, device=device, dtype=bf, generator=g)
        gk = -torch.rand(b, h, d, device=device, generator=g) * 0.1
        beta = torch.rand(b, h, device=device, dtype=bf, generator=g)
        state = torch.randn(b, h, d, d, device=device, generator=g) * 0.02
        essential = 2 * state.nbytes + q.nbytes * 4 + gk.nbytes + beta.nbytes
        timed("kda delta rule (fla kernel, state in place)",
              lambda q=q, k=k, v=v, gk=gk, beta=beta, state=state: K.kda_step(
                  q, k, v, gk, beta, state, use_qk_l2norm=True), essential, b)
        del q, k, v, gk, beta, state
        free_memory(device)
    ctx = 32768
    for b in (1, 16):
        q = torch.randn(b, 1, hq, dh, device=device, dtype=bf, generator=g)
        kc = torch.randn(b, ctx, hkv, dh, device=device, dtype=bf, generator=g)
        vc = torch.randn(b, ctx, hkv, dh, device=device, dtype=bf, generator=g)
        valid = torch.ones(b, ctx, dtype=torch.bool, device=device)
        essential = kc.nbytes + vc.nbytes + 2 * q.nbytes
        timed("attention decode 32K (SDPA, validity mask)",
              lambda q=q, kc=kc, vc=vc, valid=valid: K.attention_decode(q, kc, vc, valid, scale=dh**-0.5),
              essential, b)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def nomask(q=q, kc=kc, vc=vc):  # type: ignore[no-untyped-def]
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), scale=dh**-0.5, enable_gqa=True)

        try:
            timed("attention decode 32K (SDPA, no mask)", nomask, essential, b)
        except Exception as e:  # a backend may refuse the shapes
            rows.append({"kernel": "attention decode 32K (SDPA, no mask)", "batch": b, "error": str(e)[:200]})
        del q, kc, vc, valid
        free_memory(device)
    return rows


# --------------------------------------------------------------------------------------------
# Analysis




def run_measure_decode(args: list[str]) -> None:
    """``measure_decode.py ARGS`` in a child process (the analyses' ``--measure``); raises if it fails."""
    import subprocess

    subprocess.run([sys.executable, str(HERE / "measure_decode.py"), *args], check=True)
