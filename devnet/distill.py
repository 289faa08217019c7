"""The supernet, trained by stochastic distillation from the teacher (as the Super Apriel release describes).

Initialisation: :func:`.transfer.init_from_teacher` (shared tensors and attention copied, GDN/KDA from the
attention projections). Training: every micro-batch draws one placement, each layer's mixer uniformly among the
mixers that layer offers; the teacher (frozen, all-attention) and the student run the same tokens; the loss is
``KL(teacher || student)`` of the next-token distributions, averaged over tokens, plus optionally
``hidden_mse_weight`` times the hidden-state MSE of every block's output normalised by the teacher's mean
square. Only mixer parameters train: the MLPs, norms, embeddings and LM head stay the teacher's.

Exports: ``kept_checkpoints`` intermediate snapshots at evenly spaced fractions of training
(``supernet-step{N:06d}/``: the mixer tensors only, overlaid on the final supernet by
:mod:`.snapshots`, which rebuilds a normal Apriel2 directory or a loaded model) for ranking-stability studies,
and the final supernet (``supernet/``, Apriel2 supernet format with the tokenizer).
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from placement_search.devnet.config import Settings
from placement_search.devnet.corpus import Corpus
from placement_search.devnet.data import step_rng, train_batch
from placement_search.devnet.evaluate import EvalSet, evaluate
from placement_search.devnet.loop import StageResult, autocast, run_stage
from placement_search.devnet.snapshots import save_snapshot
from placement_search.devnet.tokenizer import copy_tokenizer
from placement_search.devnet.transfer import init_from_teacher, is_shared
from placement_search.evaluators import Supernet, save_checkpoint
from placement_search.files import write_json_atomic
from placement_search.spec import ModelSpec


def sample_placement(spec: ModelSpec, seed: int, step: int, micro: int) -> list[str]:
    """Micro-batch ``micro`` of ``step``: each layer's mixer uniform over what it offers (deterministic)."""
    rng = step_rng(seed, 1, step * 1024 + micro)
    space = spec.search_space
    out = []
    for i in range(spec.num_layers):
        names = space.allowed_at(i)
        out.append(names[int(rng.integers(0, len(names)))])
    return out


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: list[torch.Tensor] | None = None,
    teacher_hidden: list[torch.Tensor] | None = None,
    hidden_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``KL(teacher || student)`` per token (fp32) ``+ hidden_weight * mean_l ||h_s - h_t||^2 / ||h_t||^2``.

    ``*_logits [B, T, V]``; ``*_hidden``: the ``N + 1`` states ``[B, T, d]`` (embeddings first, not compared).
    """
    s = student_logits.float().log_softmax(-1).flatten(0, 1)
    t = teacher_logits.float().log_softmax(-1).flatten(0, 1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    metrics = {"kl": float(kl.detach())}
    loss = kl
    if hidden_weight > 0 and student_hidden is not None and teacher_hidden is not None:
        terms = [
            (hs.float() - ht.float()).pow(2).mean() / ht.float().pow(2).mean().clamp_min(1e-8)
            for hs, ht in zip(student_hidden[1:], teacher_hidden[1:], strict=True)
        ]
        mse = torch.stack(terms).mean()
        loss = loss + hidden_weight * mse
        metrics["hidden_mse"] = float(mse.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def export_supernet(model: Supernet, path: Path, tokenizer_dir: Path, dtype: torch.dtype, info: dict[str, Any]) -> Path:
    """Save the whole supernet in ``dtype`` (Apriel2 supernet format, shards <= 15 MiB) with the tokenizer."""
    copy = deepcopy(model).to(dtype)  # a copy: rounding the training weights in place would lose precision
    save_checkpoint(copy, path, max_shard_bytes=15 * 1024**2)
    del copy
    copy_tokenizer(tokenizer_dir, path)
    write_json_atomic(path / "devnet.json", info)
    return path


def copied_lr_scale(name: str, ds: Any) -> float:
    """``ds.copied_lr_scale`` for the attention and sliding-window mixers (copied from the teacher: already trained,
    they only need to adapt to their mixed neighbours), 1 for GDN and KDA (initialised, then learnt)."""
    copied = ".mixers.attention." in name or ".mixers.sliding_window." in name
    return float(ds.copied_lr_scale) if copied else 1.0


def snapshot_name(step: int) -> str:
    """Directory name of the intermediate snapshot taken after ``step`` optimiser steps."""
    return f"supernet-step{step:06d}"


def export_steps(total: int, kept: int) -> list[int]:
    """Steps of the intermediate checkpoints: ``total * k / (kept + 1)`` for ``k = 1..kept`` (distinct, > 0)."""
    return sorted({max(1, round(total * k / (kept + 1))) for k in range(1, kept + 1)} - {total})


def train_supernet(
    settings: Settings,
    spec: ModelSpec,
    teacher: Supernet,
    corpus: Corpus,
    out: Path,
    device: torch.device,
    stop_after: int | None = None,
) -> tuple[StageResult, dict[str, Any]]:
    """Distil (or resume) the supernet under ``out``; returns the stage result and the init mapping report.

    Writes ``out/supernet-state/``, ``out/distill-log.jsonl``, ``out/supernet-step*/`` and ``out/supernet/``.
    """
    ds = settings.distill
    cs = settings.corpus
    teacher.eval().requires_grad_(False)
    report: dict[str, Any] = {}
    save_dtype = getattr(torch, settings.save_dtype)

    def build() -> Supernet:
        student = Supernet(spec, device=device, seed=ds.seed)
        report.update(init_from_teacher(student, teacher))
        write_json_atomic(out / "supernet-init.json", report)
        return student

    evalset = EvalSet.from_corpus(
        corpus, range(min(ds.eval_blocks, len(corpus.heldout_blocks()))),
        range(min(ds.eval_blocks, corpus.synthetic_heldout.shape[0])), device, settings.evidence.batch_size,
    )  # fmt: skip
    micro = max(1, -(-ds.batch_size // ds.micro_batches))
    want_hidden = ds.hidden_mse_weight > 0

    def step_fn(model: Supernet, step: int) -> dict[str, float]:
        batch = train_batch(corpus, ds.batch_size, cs.seq_len, cs.synthetic_fraction, ds.seed, step).to(device)
        sums: dict[str, float] = {}
        counts = {name: 0 for name in spec.mixer_names}
        for k, x in enumerate(batch.split(micro)):
            placement = sample_placement(spec, ds.seed, step, k)
            for name in placement:
                counts[name] += 1
            model.set_placement(placement)
            with torch.no_grad(), autocast(device):
                t_out = teacher(x, return_hidden_states=want_hidden)
            with autocast(device):
                s_out = model(x, return_hidden_states=want_hidden)
            if want_hidden:
                loss, metrics = distill_loss(s_out[0], t_out[0], s_out[1], t_out[1], ds.hidden_mse_weight)
            else:
                loss, metrics = distill_loss(s_out, t_out)
            share = x.shape[0] / batch.shape[0]
            (loss * share).backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * share
        return {**sums, **{f"n_{name}": float(c) for name, c in counts.items()}}

    uniform = {name: [name] * spec.num_layers for name in spec.mixer_names}

    def eval_fn(model: Supernet, step: int) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for name, placement in uniform.items():
            r = evaluate(model, placement, evalset, settings.size.window_size, teacher=teacher)
            res[f"all_{name}"] = {"loss": r["loss"], "kl": r["kl"],
                                  "retrieval": r.get("retrieval", {}).get("acc")}  # fmt: skip
        return res

    def export_fn(model: Supernet, step: int, total: int) -> None:
        if step in export_steps(total, ds.kept_checkpoints):
            info = {"stage": "distill", "step": step, "total_steps": total}
            save_snapshot(model, out / snapshot_name(step), info, dtype=save_dtype)

    result = run_stage(
        "supernet", out / "supernet-state", out / "distill-log.jsonl", ds, device,
        build_model=build, trainable=lambda name: not is_shared(name), step_fn=step_fn, eval_fn=eval_fn,
        export_fn=export_fn, stop_after=stop_after, lr_scale=lambda name: copied_lr_scale(name, ds),
    )  # fmt: skip
    if result.finished:
        info = {"stage": "distill", "step": result.steps, "total_steps": result.steps, "final": True}
        export_supernet(result.model, out / "supernet", out / "tokenizer", save_dtype, info)
    return result, report
