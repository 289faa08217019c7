"""The teacher: an all-attention model of the supernet's block design, trained from scratch.

It is the supernet built thin with only the ``attention`` mixer of every layer (same embeddings, norms, MLPs,
head and attention shapes), trained on next-token prediction over the corpus mix with AdamW, warm-up + cosine,
gradient clipping and bf16 autocast on CUDA (see :mod:`.loop`). The final teacher is exported as a fixed
all-attention Apriel2 checkpoint (``pattern`` decoder of plain ``attention`` mixers) plus the tokenizer.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from placement_search.devnet.config import Settings
from placement_search.devnet.corpus import Corpus
from placement_search.devnet.data import train_batch
from placement_search.devnet.evaluate import EvalSet, evaluate, lm_loss
from placement_search.devnet.loop import StageResult, autocast, run_stage
from placement_search.devnet.tokenizer import copy_tokenizer
from placement_search.evaluators import Supernet, save_checkpoint
from placement_search.spec import ModelSpec

TEACHER_MIXER = "attention"


def build_teacher(spec: ModelSpec, seed: int, device: torch.device) -> Supernet:
    """A randomly initialised all-attention model (the supernet with only ``attention`` built)."""
    model = Supernet(spec, [[TEACHER_MIXER]] * spec.num_layers, device=device, seed=seed)
    model.set_placement([TEACHER_MIXER] * spec.num_layers)
    return model


def export(model: Supernet, path: Path, tokenizer_dir: Path, dtype: torch.dtype) -> Path:
    """Save ``model`` (its current placement, as a fixed Apriel2 export) in ``dtype`` with the tokenizer."""
    copy = deepcopy(model).to(dtype)  # a copy: rounding the training weights in place would lose precision
    save_checkpoint(copy, path, placement=list(model.placement))
    del copy
    copy_tokenizer(tokenizer_dir, path)
    return path


def train_teacher(
    settings: Settings,
    spec: ModelSpec,
    corpus: Corpus,
    out: Path,
    device: torch.device,
    stop_after: int | None = None,
) -> tuple[StageResult, dict[str, Any]]:
    """Train (or resume) the teacher under ``out``; returns the stage result and its final evaluation.

    Writes ``out/teacher-state/`` (resumable), ``out/teacher-log.jsonl`` and, once finished, ``out/teacher/``.
    """
    ts = settings.teacher
    cs = settings.corpus
    evalset = EvalSet.from_corpus(
        corpus, range(min(ts.eval_blocks, len(corpus.heldout_blocks()))),
        range(min(ts.eval_blocks, corpus.synthetic_heldout.shape[0])), device, settings.evidence.batch_size,
    )  # fmt: skip
    micro = max(1, ts.batch_size // ts.micro_batches)

    def step_fn(model: Supernet, step: int) -> dict[str, float]:
        batch = train_batch(corpus, ts.batch_size, cs.seq_len, cs.synthetic_fraction, ts.seed, step).to(device)
        total = 0.0
        for x in batch.split(micro):
            with autocast(device):
                loss = lm_loss(model(x), x)
            (loss * x.shape[0] / batch.shape[0]).backward()
            total += float(loss.detach()) * x.shape[0] / batch.shape[0]
        return {"loss": total}

    def eval_fn(model: Supernet, step: int) -> dict[str, Any]:
        r = evaluate(model, None, evalset, settings.size.window_size)
        return {"heldout_loss": r["loss"], "retrieval": r.get("retrieval", {}).get("acc")}

    result = run_stage(
        "teacher", out / "teacher-state", out / "teacher-log.jsonl", ts, device,
        build_model=lambda: build_teacher(spec, ts.seed, device),
        trainable=lambda name: True, step_fn=step_fn, eval_fn=eval_fn, stop_after=stop_after,
    )  # fmt: skip
    final = evaluate(result.model, None, evalset, settings.size.window_size)
    if result.finished:
        export(result.model, out / "teacher", out / "tokenizer", getattr(torch, settings.save_dtype))
    return result, final
