"""Quality of one placement: held-out loss, KL to the teacher, and key-value retrieval accuracy by distance.

All functions run without gradients, in batches, under bf16 autocast on CUDA and in fp32 on CPU.

- Held-out loss: mean next-token cross-entropy (nats/token) over each held-out stdlib block ``[T]``
  (predictions of tokens ``1..T-1``), per block, so sample sets and standard errors can be formed.
- KL: ``KL(teacher || student)`` per token, averaged per block; the teacher's log-probabilities are computed
  once per :class:`EvalSet` and cached.
- Retrieval: a query is answered when the argmax prediction of every answer token (teacher-forced) is right;
  accuracy is reported per distance bin (in tokens, relative to the sliding window ``W``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from placement_search.devnet.corpus import Corpus
from placement_search.devnet.loop import autocast
from placement_search.evaluators import Supernet


def distance_bins(window: int, seq_len: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` token-distance bins: inside the window, then 1-2 W, 2-4 W, beyond 4 W."""
    edges = [0, window, 2 * window, 4 * window, seq_len]
    edges = sorted(set(min(e, seq_len) for e in edges))
    return [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]


@dataclass
class EvalSet:
    """Held-out blocks ``[N, T]`` and synthetic blocks ``[M, T]`` with their queries, on ``device``."""

    blocks: torch.Tensor
    kv_blocks: torch.Tensor
    kv_block: np.ndarray  # [Q] index into kv_blocks
    kv_answer_start: np.ndarray
    kv_answer_len: np.ndarray
    kv_distance: np.ndarray
    batch_size: int
    _teacher_logp: list[torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_corpus(
        cls,
        corpus: Corpus,
        block_ids: Sequence[int],
        kv_block_ids: Sequence[int],
        device: torch.device,
        batch_size: int,
    ) -> EvalSet:
        """The held-out blocks ``block_ids`` and synthetic blocks ``kv_block_ids`` (with their queries)."""
        held = corpus.heldout_blocks()
        kv_ids = np.asarray(kv_block_ids, dtype=np.int64)
        remap = {int(b): i for i, b in enumerate(kv_ids)}
        keep = np.isin(corpus.kv_block, kv_ids)
        return cls(
            blocks=torch.from_numpy(held[np.asarray(block_ids, dtype=np.int64)]).to(device),
            kv_blocks=torch.from_numpy(corpus.synthetic_heldout[kv_ids].astype(np.int64)).to(device),
            kv_block=np.asarray([remap[int(b)] for b in corpus.kv_block[keep]], dtype=np.int64),
            kv_answer_start=corpus.kv_answer_start[keep].astype(np.int64),
            kv_answer_len=corpus.kv_answer_len[keep].astype(np.int64),
            kv_distance=corpus.kv_distance[keep].astype(np.int64),
            batch_size=batch_size,
        )

    def _batches(self) -> list[torch.Tensor]:
        return list(self.blocks.split(self.batch_size))

    def teacher_logp(self, teacher: Supernet) -> list[torch.Tensor]:
        """Teacher log-probabilities per batch ``[b, T-1, V]`` (bf16 on CUDA, fp32 on CPU), cached."""
        if self._teacher_logp is None:
            out = []
            dtype = torch.bfloat16 if self.blocks.device.type == "cuda" else torch.float32
            for x in self._batches():
                out.append(_logits(teacher, x)[:, :-1].float().log_softmax(-1).to(dtype))
            self._teacher_logp = out
        return self._teacher_logp


@torch.no_grad()
def _logits(model: Supernet, x: torch.Tensor) -> torch.Tensor:
    with autocast(x.device):
        return model(x)


@torch.no_grad()
def block_metrics(model: Supernet, data: EvalSet, teacher: Supernet | None = None) -> dict[str, np.ndarray]:
    """Per held-out block: ``loss [N]`` (nats/token) and, with a teacher, ``kl [N]``."""
    losses, kls = [], []
    teacher_logp = data.teacher_logp(teacher) if teacher is not None else None
    for i, x in enumerate(data._batches()):
        logp = _logits(model, x)[:, :-1].float().log_softmax(-1)  # [b, T-1, V]
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0]  # [b, T-1]
        losses.append(nll.mean(-1).double().cpu())
        if teacher_logp is not None:
            t = teacher_logp[i].float()
            kl = (t.exp() * (t - logp)).sum(-1)  # [b, T-1]
            kls.append(kl.mean(-1).double().cpu())
    out = {"loss": torch.cat(losses).numpy()}
    if kls:
        out["kl"] = torch.cat(kls).numpy()
    return out


@torch.no_grad()
def retrieval(model: Supernet, data: EvalSet) -> dict[str, np.ndarray]:
    """Per query: ``correct [Q]`` (every answer token's argmax right) and ``token_acc [Q]``."""
    preds = []
    for x in data.kv_blocks.split(data.batch_size):
        preds.append(_logits(model, x).argmax(-1).cpu())  # [b, T]: prediction of token t+1
    pred = torch.cat(preds).numpy()
    tokens = data.kv_blocks.cpu().numpy()
    correct = np.zeros(len(data.kv_block), dtype=bool)
    token_acc = np.zeros(len(data.kv_block), dtype=np.float64)
    for q, (b, s, n) in enumerate(zip(data.kv_block, data.kv_answer_start, data.kv_answer_len, strict=True)):
        hits = pred[b, s - 1 : s + n - 1] == tokens[b, s : s + n]
        correct[q] = bool(hits.all())
        token_acc[q] = float(hits.mean())
    return {"correct": correct, "token_acc": token_acc}


def summarize_retrieval(
    correct: np.ndarray, distance: np.ndarray, window: int, seq_len: int
) -> dict[str, Any]:
    """Accuracy inside / beyond the window and per distance bin (with query counts)."""
    inside = distance < window

    def acc(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    return {
        "acc": acc(np.ones_like(inside)),
        "acc_within_window": acc(inside),
        "acc_beyond_window": acc(~inside),
        "bins": [
            {"lo": lo, "hi": hi, "n": int(((distance >= lo) & (distance < hi)).sum()),
             "acc": acc((distance >= lo) & (distance < hi))}
            for lo, hi in distance_bins(window, seq_len)
        ],
    }


def evaluate(
    model: Supernet,
    placement: Sequence[str] | None,
    data: EvalSet,
    window: int,
    teacher: Supernet | None = None,
    with_retrieval: bool = True,
) -> dict[str, Any]:
    """Summary metrics of ``placement`` (``None``: the model's current one) on ``data``."""
    if placement is not None:
        model.set_placement(list(placement))
    m = block_metrics(model, data, teacher)
    out: dict[str, Any] = {
        "loss": float(m["loss"].mean()),
        "loss_se": float(m["loss"].std(ddof=1) / np.sqrt(len(m["loss"]))) if len(m["loss"]) > 1 else 0.0,
    }
    if "kl" in m:
        out["kl"] = float(m["kl"].mean())
    if with_retrieval and len(data.kv_block):
        r = retrieval(model, data)
        out["retrieval"] = summarize_retrieval(r["correct"], data.kv_distance, window, data.kv_blocks.shape[1])
        out["retrieval"]["token_acc"] = float(r["token_acc"].mean())
    return out


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` for ``tokens [B, T]`` (fp32)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
