"""Training batches: a deterministic function of (seed, step), so a resumed run sees the same data.

Each row is, with probability ``synthetic_fraction``, a whole synthetic key-value block, otherwise a random
crop of ``seq_len`` tokens from the train stdlib stream. Nothing here keeps state between steps.
"""

from __future__ import annotations

import numpy as np
import torch

from placement_search.devnet.corpus import Corpus


def step_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    """The generator of ``step`` for one purpose (``stream``: 0 batches, 1 placements, ...)."""
    return np.random.default_rng([seed, stream, step])


def train_batch(
    corpus: Corpus, batch_size: int, seq_len: int, synthetic_fraction: float, seed: int, step: int
) -> torch.Tensor:
    """Token ids ``[batch_size, seq_len]`` (int64, CPU) of training step ``step``."""
    rng = step_rng(seed, 0, step)
    rows = np.empty((batch_size, seq_len), dtype=np.int64)
    n_train = len(corpus.train_tokens)
    n_syn = corpus.synthetic_train.shape[0]
    if n_train <= seq_len and n_syn == 0:
        raise ValueError(f"corpus too small: {n_train} train tokens for blocks of {seq_len}")
    for i in range(batch_size):
        use_syn = n_syn > 0 and (n_train <= seq_len or rng.random() < synthetic_fraction)
        if use_syn:
            rows[i] = corpus.synthetic_train[int(rng.integers(0, n_syn)), :seq_len]
        else:
            start = int(rng.integers(0, n_train - seq_len))
            rows[i] = corpus.train_tokens[start : start + seq_len]
    return torch.from_numpy(rows)


def eval_blocks(corpus: Corpus, count: int, offset: int = 0) -> torch.Tensor:
    """Held-out stdlib blocks ``[min(count, available), seq_len]`` starting at block ``offset``."""
    blocks = corpus.heldout_blocks()[offset : offset + count]
    if len(blocks) == 0:
        raise ValueError(f"no held-out blocks at offset {offset} (have {len(corpus.heldout_blocks())})")
    return torch.from_numpy(blocks)
