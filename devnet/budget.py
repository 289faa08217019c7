"""How long the pipeline takes on one H200, estimated from a CPU measurement and a FLOP count.

Two bounds per training step, both per optimiser step of ``batch_size x seq_len`` tokens:

- compute: matmul + attention FLOPs (forward ``2 * active params`` per token plus ``4 * keys * head_size`` per
  query head for attention; training ``x3`` for forward + backward; distillation adds a teacher forward) at an
  assumed ``MFU`` of the H200's measured 790 TFLOP/s bf16 — tiny matrices (hidden 128) reach only a few
  percent of peak, hence the low default;
- launches: the number of aten ops of one step, counted on the CPU with a dispatch hook, times an eager
  per-op cost (``OP_US``) — the regime a model this narrow is in. The CPU path runs the chunked delta rule as
  many small torch ops (a loop over 64-token chunks) where the GPU runs one fla kernel, and the attention
  reference as an explicit softmax where the GPU runs one SDPA / FlexAttention call, so this count is an
  upper bound for the GPU.

The training stages are calibrated to wall-clock budgets (``minutes``), so the estimate says how many steps and
tokens those budgets buy, and what the fixed costs (start-up, Triton / FlexAttention compilation, evidence) add.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from placement_search.devnet.config import Settings, model_spec
from placement_search.devnet.distill import distill_loss
from placement_search.devnet.evaluate import lm_loss
from placement_search.devnet.teacher import build_teacher
from placement_search.evaluators import Supernet
from placement_search.spec import AttentionSpec, ModelSpec

PEAK_FLOPS = 790e12  # bf16, measured on the H200 (docs/platform.md)
MFU = 0.05  # assumed for hidden-128 matmuls
OP_US = 10.0  # eager per-op cost (launch + Python dispatch), microseconds


class _OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def forward_flops_per_token(spec: ModelSpec, placement: list[str], seq_len: int) -> float:
    """Forward FLOPs per token: 2 x (active weights excluding the embedding table) + attention scores/values."""
    d = spec.hidden_size
    flops = 2.0 * (spec.placement_params(placement) - spec.vocab_size * d)
    for i, name in enumerate(placement):
        m = spec.mixer(i, name)
        if isinstance(m, AttentionSpec):
            keys = min(m.window_size, seq_len) if m.window_size else (seq_len + 1) / 2
            flops += 4.0 * keys * m.heads * m.head_size
    return flops


def _time_and_count(fn: Any) -> tuple[float, int]:
    fn()  # warm-up
    counter = _OpCounter()
    with counter:
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, counter.count


def estimate_gpu_minutes(settings: Settings, batch: int = 1) -> dict[str, Any]:
    """Measure one teacher and one distillation step on this CPU (``batch`` rows) and estimate H200 times."""
    spec = model_spec(settings.size)
    n, T = spec.num_layers, settings.corpus.seq_len
    x = torch.randint(0, spec.vocab_size, (batch, T))
    teacher = build_teacher(spec, 0, torch.device("cpu"))
    student = Supernet(spec, seed=1)
    names = list(spec.mixer_names)
    mixed = [names[i % len(names)] for i in range(n)]
    student.set_placement(mixed)

    def teacher_step() -> None:
        lm_loss(teacher(x), x).backward()
        teacher.zero_grad(set_to_none=True)

    def distill_step() -> None:
        with torch.no_grad():
            t = teacher(x)
        distill_loss(student(x), t)[0].backward()
        student.zero_grad(set_to_none=True)

    t_cpu, t_ops = _time_and_count(teacher_step)
    d_cpu, d_ops = _time_and_count(distill_step)
    # GPU proxy: with fla, a GDN/KDA layer issues about as many ops as an attention layer, so count a
    # distillation step whose student runs all-attention (the CPU chunk loops above are an upper bound)
    student.set_placement(["attention"] * n)
    _, d_ops_proxy = _time_and_count(distill_step)
    all_attention = ["attention"] * n
    f_teacher = 3 * forward_flops_per_token(spec, all_attention, T)
    f_distill = forward_flops_per_token(spec, all_attention, T) + 3 * forward_flops_per_token(spec, mixed, T)
    out: dict[str, Any] = {
        "assumptions": {"peak_flops": PEAK_FLOPS, "mfu": MFU, "op_us": OP_US},
        "cpu": {
            "threads": torch.get_num_threads(),
            "batch_rows": batch,
            "seq_len": T,
            "teacher_step_s": t_cpu,
            "teacher_tokens_per_s": batch * T / t_cpu,
            "distill_step_s": d_cpu,
            "distill_tokens_per_s": batch * T / d_cpu,
            "teacher_step_aten_ops": t_ops,
            "distill_step_aten_ops": d_ops,
            "distill_step_aten_ops_gpu_proxy": d_ops_proxy,
        },
        "flops_per_token": {"teacher_train": f_teacher, "distill_train": f_distill},
        "stages": {},
    }
    for stage, ts, flops, ops in (("teacher", settings.teacher, f_teacher, t_ops),
                                  ("distill", settings.distill, f_distill, d_ops_proxy)):  # fmt: skip
        tokens = ts.batch_size * T
        compute = tokens * flops / (PEAK_FLOPS * MFU)
        # ops grow with micro-batches (one forward/backward each), not with rows
        launch = ops * max(1, ts.micro_batches) * OP_US * 1e-6
        upper = (d_ops if stage == "distill" else ops) * max(1, ts.micro_batches) * OP_US * 1e-6
        step_s = max(compute, launch)
        steps = ts.steps if ts.steps is not None else int(ts.minutes * 60 * 0.9 / step_s)
        out["stages"][stage] = {
            "tokens_per_step": tokens,
            "compute_bound_step_s": compute,
            "launch_bound_step_s": launch,
            "launch_bound_step_s_cpu_op_count": upper,
            "estimated_step_s": step_s,
            "steps": steps,
            "tokens": steps * tokens,
            "minutes": steps * step_s / 60 if ts.steps is not None else ts.minutes,
        }
    fixed_min = 1.5  # interpreter + wheels + first Triton/FlexAttention compilations
    n_eval = 4 + settings.evidence.random_placements + 4 * (3 + settings.evidence.arrangements)
    eval_rows = 2 * (settings.evidence.eval_blocks + settings.evidence.kv_blocks)
    evidence_s = n_eval * eval_rows * T * 2 * forward_flops_per_token(spec, mixed, T) / (PEAK_FLOPS * MFU)
    evidence_s = max(evidence_s, n_eval * 2 * 2 * (d_ops_proxy / 6) * OP_US * 1e-6)
    out["evidence_minutes"] = evidence_s / 60
    out["fixed_minutes"] = fixed_min
    out["total_minutes"] = fixed_min + evidence_s / 60 + sum(s["minutes"] for s in out["stages"].values())
    return out
