"""A byte-level BPE tokenizer trained here (``tokenizers``) on the corpus's train split.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` so that
``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`` (what
:func:`placement_search.evaluators.load_tokenizer` calls) loads it offline as a ``PreTrainedTokenizerFast``.
Byte-level pre-tokenization (GPT-2 split, no prefix space) and the byte-level decoder make
``decode(encode(text)) == text`` for any text, and splitting a text at newlines and encoding the lines one by
one gives the same ids as encoding it whole (the split regex never joins across a newline); the synthetic
retrieval documents rely on that (:mod:`.corpus`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from placement_search.devnet.config import EOS_TOKEN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE with ``vocab_size`` entries (256 byte symbols + merges + the EOS token, id 0)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    return tok


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Long files in pieces cut at newlines (bounds the trainer's per-item memory; pre-tokens never span them)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + size)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike[str], *, model_max_length: int) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into directory ``path``."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tok.save(str(p / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (p / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return p


def load_tokenizer_json(path: str | os.PathLike[str]) -> Tokenizer:
    """The raw ``tokenizers.Tokenizer`` from ``path/tokenizer.json`` (or the file itself)."""
    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def copy_tokenizer(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy the tokenizer files beside a checkpoint's weights."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(src) / name, Path(dst) / name)


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""
    return tok.encode(text, add_special_tokens=False).ids
