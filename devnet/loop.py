"""The training loop shared by the teacher and the distillation stages.

:func:`run_stage` resumes from the stage's state directory when one exists, calibrates the number of steps from
a wall-clock budget when the settings give none (timing steps 3..12, still in the linear warm-up, so the
schedule so far does not depend on the total; the budget buys ``0.9 * minutes`` minus the time already spent,
and a stage still running at ``minutes`` stops there, its schedule cut short and recorded in the state's
``extra.deadline_stop``), evaluates once before the first step (the curves' starting point, and the evaluation
shapes' compilation done before the calibration), then per step: the stage's ``step_fn`` (forward + backward of
every micro-batch), gradient clipping, AdamW at the warm-up + cosine learning rate, a JSONL record, and
periodically an evaluation, a resumable state and the stage's exports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from placement_search.devnet.config import TrainSettings
from placement_search.devnet.state import JsonlLog, Progress, has_state, load_state, lr_at, save_state
from placement_search.evaluators import Supernet

StepFn = Callable[[Supernet, int], dict[str, float]]
EvalFn = Callable[[Supernet, int], dict[str, Any]]
ExportFn = Callable[[Supernet, int, int], None]  # (model, step, total_steps)

_CALIBRATION = (3, 13)  # steps [3, 13) are timed to calibrate a wall-clock budget


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA; nothing on CPU (the CPU kernels compute in fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(
    model: Supernet,
    settings: TrainSettings,
    trainable: Callable[[str], bool],
    lr_scale: Callable[[str], float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over the parameters ``trainable(name)`` accepts (the others get ``requires_grad=False``).

    Weight decay applies to matrices (``dim >= 2``: projections, embeddings, convolutions), not to norms,
    ``A_log`` or ``dt_bias``. ``lr_scale(name)`` (default 1) multiplies the scheduled learning rate of that
    parameter (kept per group as ``"lr_scale"``).
    """
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
        if p.requires_grad:
            key = (p.dim() >= 2, float(lr_scale(name)) if lr_scale is not None else 1.0)
            groups.setdefault(key, []).append(p)
    param_groups = [
        {"params": params, "weight_decay": settings.weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=settings.lr, betas=settings.betas, fused=fused)


@dataclass
class StageResult:
    """What a finished (or resumed-and-finished) stage reports."""

    model: Supernet
    steps: int
    total_steps: int | None
    elapsed_s: float
    resumed_from: int
    last_loss: float | None

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and self.steps >= self.total_steps


def run_stage(
    name: str,
    state_dir: Path,
    log: Path,
    settings: TrainSettings,
    device: torch.device,
    build_model: Callable[[], Supernet],
    trainable: Callable[[str], bool],
    step_fn: StepFn,
    eval_fn: EvalFn | None = None,
    export_fn: ExportFn | None = None,
    stop_after: int | None = None,
    lr_scale: Callable[[str], float] | None = None,
) -> StageResult:
    """Train one stage to its last step (resuming from ``state_dir``); see the module docstring.

    ``stop_after``: stop (with a saved state) once this many steps are done, to test resumption.
    ``lr_scale(name)``: a per-parameter factor on the scheduled learning rate (:func:`make_optimizer`).
    """

    def factory(model: Supernet) -> torch.optim.AdamW:
        return make_optimizer(model, settings, trainable, lr_scale)

    if has_state(state_dir):
        model, optimizer, progress = load_state(state_dir, factory, device=device)
        jlog = JsonlLog(log, resume_step=progress.step)
    else:
        model = build_model()
        model.train()
        optimizer = factory(model)
        progress = Progress(total_steps=settings.steps)
        jlog = JsonlLog(log)
    resumed_from = progress.step
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start = time.perf_counter() - progress.elapsed_s
    calib_t0: float | None = None
    bar = tqdm(total=progress.total_steps, initial=progress.step, desc=name, unit="step", mininterval=2.0)
    last_loss: float | None = None
    step = progress.step
    if eval_fn is not None and step == 0:
        # the starting point of the curves; also compiles / autotunes the evaluation shapes before the
        # wall-clock calibration, so they do not eat into the training budget unseen
        model.eval()
        jlog.write({"kind": "eval", "step": 0, **eval_fn(model, 0)})
        model.train()
    # hard wall-clock bound of a calibrated stage: the schedule is cut short (and recorded) if it overruns
    deadline_s = settings.minutes * 60 if settings.steps is None else None
    while progress.total_steps is None or step < progress.total_steps:
        if stop_after is not None and step >= stop_after:
            break
        if (deadline_s is not None and progress.total_steps is not None and step > 0
                and time.perf_counter() - start > deadline_s):  # fmt: skip
            progress.extra["deadline_stop"] = {"step": step, "planned_steps": progress.total_steps}
            progress.total_steps = step
            progress.elapsed_s = time.perf_counter() - start
            save_state(state_dir, model, optimizer, progress)
            break
        if progress.total_steps is None and step == _CALIBRATION[0]:
            _sync(device)
            calib_t0 = time.perf_counter()
        total_for_lr = progress.total_steps or settings.max_steps
        lr = lr_at(step, total_for_lr, settings.lr, settings.warmup_steps, settings.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        metrics = step_fn(model, step)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.step = step
        last_loss = metrics.get("loss")
        if progress.total_steps is None and step == _CALIBRATION[1]:
            _sync(device)
            per_step = (time.perf_counter() - (calib_t0 or start)) / (_CALIBRATION[1] - _CALIBRATION[0])
            budget = settings.minutes * 60 * 0.9 - (time.perf_counter() - start)
            total = step + int(budget / per_step)
            progress.total_steps = max(settings.warmup_steps + 1, min(settings.max_steps, total))
            progress.extra["calibrated_step_s"] = per_step
            bar.reset(total=progress.total_steps)
            bar.update(step - 1)  # the step itself is counted below
        elif progress.total_steps is None and step >= settings.max_steps:
            progress.total_steps = settings.max_steps
        elapsed = time.perf_counter() - start
        total = progress.total_steps
        done = total is not None and step >= total
        if step % settings.log_every == 0 or done:
            if any(not math.isfinite(v) for v in metrics.values()):
                raise FloatingPointError(f"{name}: non-finite metrics at step {step}: {metrics}")
            jlog.write({"kind": "train", "step": step, "lr": lr, "grad_norm": grad_norm, "elapsed_s": elapsed,
                        **metrics})  # fmt: skip
        if eval_fn is not None and (step % settings.eval_every == 0 or done):
            model.eval()
            jlog.write({"kind": "eval", "step": step, **eval_fn(model, step)})
            model.train()
        if export_fn is not None and total is not None:
            export_fn(model, step, total)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}" if last_loss is not None else "-", refresh=False)
        if step % settings.save_every == 0 or done or (stop_after is not None and step >= stop_after):
            progress.elapsed_s = time.perf_counter() - start
            save_state(state_dir, model, optimizer, progress)
    bar.close()
    progress.elapsed_s = time.perf_counter() - start
    model.eval()
    return StageResult(model, step, progress.total_steps, progress.elapsed_s, resumed_from, last_loss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
