"""The offline corpus: the standard library's Python sources, plus synthetic key-value retrieval documents.

Every machine has a standard library, but not the same one (the GPU machine runs Python 3.12, the CPU
machines 3.11), so the corpus is built once, tokenized, and shipped as a compact file that any machine reads
back exactly:

- ``corpus.npz`` (uint16 token ids; ``np.load(..., allow_pickle=False)``)
    - ``train_tokens [Ntr]``, ``heldout_tokens [Nho]``: streams of the train / held-out stdlib files, each file
      preceded by the EOS token (``train_doc_offsets``, ``heldout_doc_offsets`` hold where each file starts);
    - ``synthetic_train [S, L]``, ``synthetic_heldout [Sh, L]``: key-value retrieval blocks of ``L = seq_len``
      tokens, each starting with EOS;
    - ``kv_block``, ``kv_answer_start``, ``kv_answer_len``, ``kv_definition_start`` ``[Q]`` int32: for every
      query of the held-out synthetic blocks, its block, the position and length of the answer tokens, and the
      position of the value's definition (distance = answer start - definition start).
- ``corpus-manifest.json``: which file went where (relative path, split, bytes, SHA-256, tokens, whether the
  train-token cap kept it), the files skipped and why, the Python version, the settings, the mix.

Files (:func:`select_files`): every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` in sorted order, minus
test directories (``test``, ``tests``, ``idle_test``, ...), ``site-packages``, files outside the size caps and
files that are not UTF-8. Split (:func:`split_of`): SHA-256 of the relative path, first 8 bytes as an integer,
mod 1000, below ``heldout_permille`` -> held out. The split depends on the path alone, so it is the same on
every machine and disjoint by file.

Synthetic documents (:func:`kv_block`): Python-like lines ``key_0173 = 'qzv41'`` (definitions),
``n_0412 = 5817`` (filler) and ``assert key_0173 == 'qzv41'`` (queries, each answering an earlier definition),
with about half the queries closer than the sliding window and half farther back, so that retrieval beyond the
window is learnable (by full attention, possibly by the recurrent mixers) and measurable.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from placement_search.devnet.config import EOS_TOKEN, CorpusSettings
from placement_search.files import write_json_atomic

CORPUS_FILE = "corpus.npz"
MANIFEST_FILE = "corpus-manifest.json"
#: Directory names never taken from the stdlib (tests, third-party packages, bundled wheels, caches).
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"})
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------------------------
# Standard-library files


@dataclass(frozen=True)
class SourceFile:
    """One stdlib file chosen for the corpus."""

    path: str  # relative to the stdlib root, POSIX separators
    split: str  # "train" or "heldout"
    text: str
    sha256: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def split_of(relative_path: str, heldout_permille: int) -> str:
    """``"heldout"`` when the path's hash falls in the held-out share, else ``"train"`` (machine-independent)."""
    h = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 1000 < heldout_permille else "train"


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def select_files(
    settings: CorpusSettings, root: str | os.PathLike[str] | None = None
) -> tuple[list[SourceFile], list[dict[str, str]]]:
    """The chosen files in sorted path order, and the skipped ones as ``{"path", "reason"}``."""
    base = Path(root) if root is not None else stdlib_root()
    chosen: list[SourceFile] = []
    skipped: list[dict[str, str]] = []
    candidates: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(base)
        candidates.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    for rel in sorted(candidates):
        if settings.max_files is not None and len(chosen) >= settings.max_files:
            break
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("test_") or name == "__phello__.foo.py":
            skipped.append({"path": rel, "reason": "test file"})
            continue
        size = (base / rel).stat().st_size
        if size > settings.max_file_bytes or size < settings.min_file_bytes:
            skipped.append({"path": rel, "reason": f"size {size} bytes outside the caps"})
            continue
        try:
            text = (base / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            skipped.append({"path": rel, "reason": f"unreadable ({type(e).__name__})"})
            continue
        text = text.replace("\r\n", "\n")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        chosen.append(SourceFile(rel, split_of(rel, settings.heldout_permille), text, digest))
    return chosen, skipped


# --------------------------------------------------------------------------------------------
# Synthetic key-value retrieval blocks


@dataclass(frozen=True)
class KVQuery:
    """One query of a synthetic block: answer tokens ``[answer_start, answer_start + answer_len)``."""

    answer_start: int
    answer_len: int
    definition_start: int  # first token of the value in the defining line

    @property
    def distance(self) -> int:
        return self.answer_start - self.definition_start


def kv_block(
    encode: Callable[[str], list[int]],
    rng: np.random.Generator,
    length: int,
    window: int,
    eos_id: int,
) -> tuple[np.ndarray, list[KVQuery]]:
    """One synthetic block: ``tokens [length]`` (EOS first) and its queries (answers fully inside the block).

    Lines are tokenized one at a time (the tokenizer never merges across a newline, so this equals encoding the
    whole text); each line is split at the quote so the value's tokens are known exactly. A query picks a key
    defined within the window (``near``) or farther back (``far``) with equal probability when both exist.
    """
    tokens: list[int] = [eos_id]
    queries: list[KVQuery] = []
    live: dict[str, tuple[str, int]] = {}  # key -> (value, token position of the value)
    used_names: set[int] = set()

    def fresh(kind: str) -> str:
        while True:
            n = int(rng.integers(0, 10000))
            if n not in used_names:
                used_names.add(n)
                return f"{kind}_{n:04d}"

    while len(tokens) < length:
        r = float(rng.random())
        if live and (r < 0.35 or len(live) > 12):
            answer_at = {k: len(tokens) + len(encode(f"assert {k} == '")) for k in live}
            near = [k for k in live if answer_at[k] - live[k][1] < window]
            far = [k for k in live if answer_at[k] - live[k][1] >= window]
            pool = near if (near and (not far or rng.random() < 0.5)) else far
            key = pool[int(rng.integers(0, len(pool)))]
            value, def_pos = live.pop(key)
            prefix = encode(f"assert {key} == '")
            answer = encode(value)
            queries.append(KVQuery(len(tokens) + len(prefix), len(answer), def_pos))
            tokens += prefix + answer + encode("'\n")
        elif r < 0.7:
            key = fresh("key")
            value = "".join(_LETTERS[i] for i in rng.integers(0, 26, 3)) + f"{int(rng.integers(0, 100)):02d}"
            prefix = encode(f"{key} = '")
            live[key] = (value, len(tokens) + len(prefix))
            tokens += prefix + encode(value) + encode("'\n")
        else:
            tokens += encode(f"{fresh('n')} = {int(rng.integers(0, 10000))}\n")
    queries = [q for q in queries if q.answer_start + q.answer_len <= length]
    return np.asarray(tokens[:length], dtype=np.int64), queries


def kv_blocks(
    encode: Callable[[str], list[int]], count: int, length: int, window: int, eos_id: int, seed: int
) -> tuple[np.ndarray, list[list[KVQuery]]]:
    """``count`` blocks ``[count, length]`` from seed ``seed`` (block ``i`` uses its own generator)."""
    blocks = np.zeros((count, length), dtype=np.int64)
    queries: list[list[KVQuery]] = []
    for i in range(count):
        blocks[i], q = kv_block(encode, np.random.default_rng([seed, i]), length, window, eos_id)
        queries.append(q)
    return blocks, queries


# --------------------------------------------------------------------------------------------
# Building and loading


@dataclass
class Corpus:
    """The arrays of ``corpus.npz`` (see the module docstring); token arrays are uint16."""

    train_tokens: np.ndarray
    heldout_tokens: np.ndarray
    synthetic_train: np.ndarray
    synthetic_heldout: np.ndarray
    kv_block: np.ndarray
    kv_answer_start: np.ndarray
    kv_answer_len: np.ndarray
    kv_definition_start: np.ndarray
    train_doc_offsets: np.ndarray
    heldout_doc_offsets: np.ndarray

    @property
    def seq_len(self) -> int:
        return int(self.synthetic_heldout.shape[1])

    @property
    def kv_distance(self) -> np.ndarray:
        return self.kv_answer_start - self.kv_definition_start

    def heldout_blocks(self) -> np.ndarray:
        """The held-out stdlib stream cut into non-overlapping blocks ``[Nb, seq_len]`` (int64)."""
        n = len(self.heldout_tokens) // self.seq_len
        return self.heldout_tokens[: n * self.seq_len].reshape(n, self.seq_len).astype(np.int64)

    def save(self, path: str | os.PathLike[str]) -> None:
        arrays = {k: getattr(self, k) for k in self.__dataclass_fields__}
        tmp = Path(path).with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Corpus:
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _stream(docs: Sequence[list[int]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``[EOS] + doc`` for every doc: (uint16 tokens, int64 start offsets)."""
    offsets = np.zeros(len(docs), dtype=np.int64)
    parts: list[np.ndarray] = []
    pos = 0
    for i, doc in enumerate(docs):
        offsets[i] = pos
        parts.append(np.asarray([eos_id, *doc], dtype=np.uint16))
        pos += len(doc) + 1
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint16)), offsets


def build_corpus(
    files: Sequence[SourceFile],
    skipped: Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    settings: CorpusSettings,
    window: int,
    out_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Tokenize the split files, generate the synthetic blocks, write ``corpus.npz`` and the manifest.

    Train files are taken in hash order (a fixed pseudo-random order) until ``max_train_tokens``; the rest are
    recorded as ``used: false``. Returns the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.get_vocab_size() > 65535:
        raise ValueError("token ids must fit in uint16")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    ids = [e.ids for e in tokenizer.encode_batch([f.text for f in files], add_special_tokens=False)]
    order = sorted(range(len(files)), key=lambda i: hashlib.sha256(files[i].path.encode()).hexdigest())
    train_docs: list[list[int]] = []
    heldout_docs: list[list[int]] = []
    used = [False] * len(files)
    train_count = 0
    for i in order:
        if files[i].split == "heldout":
            heldout_docs.append(ids[i])
            used[i] = True
        elif train_count + len(ids[i]) + 1 <= settings.max_train_tokens:
            train_docs.append(ids[i])
            train_count += len(ids[i]) + 1
            used[i] = True
    train_tokens, train_offsets = _stream(train_docs, eos_id)
    heldout_tokens, heldout_offsets = _stream(heldout_docs, eos_id)

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    L = settings.seq_len
    syn_train, _ = kv_blocks(enc, settings.synthetic_train_blocks, L, window, eos_id, settings.seed)
    syn_held, held_queries = kv_blocks(enc, settings.synthetic_heldout_blocks, L, window, eos_id, settings.seed + 1)
    flat = [(b, q) for b, qs in enumerate(held_queries) for q in qs]
    corpus = Corpus(
        train_tokens=train_tokens,
        heldout_tokens=heldout_tokens,
        synthetic_train=syn_train.astype(np.uint16),
        synthetic_heldout=syn_held.astype(np.uint16),
        kv_block=np.asarray([b for b, _ in flat], dtype=np.int32),
        kv_answer_start=np.asarray([q.answer_start for _, q in flat], dtype=np.int32),
        kv_answer_len=np.asarray([q.answer_len for _, q in flat], dtype=np.int32),
        kv_definition_start=np.asarray([q.definition_start for _, q in flat], dtype=np.int32),
        train_doc_offsets=train_offsets,
        heldout_doc_offsets=heldout_offsets,
    )
    corpus.save(out / CORPUS_FILE)
    dist = corpus.kv_distance
    order_pos = {i: k for k, i in enumerate(order)}
    manifest = {
        "python": platform.python_version(),
        "stdlib": str(stdlib_root()),
        "settings": {**settings.__dict__},
        "window": window,
        "eos_token": EOS_TOKEN,
        "eos_id": eos_id,
        "vocab_size": tokenizer.get_vocab_size(),
        "counts": {
            "files_train": sum(1 for f, u in zip(files, used, strict=True) if u and f.split == "train"),
            "files_heldout": len(heldout_docs),
            "files_train_dropped_by_cap": sum(1 for f, u in zip(files, used, strict=True) if not u),
            "files_skipped": len(skipped),
            "train_tokens": len(train_tokens),
            "heldout_tokens": len(heldout_tokens),
            "synthetic_train_tokens": int(syn_train.size),
            "synthetic_heldout_blocks": int(syn_held.shape[0]),
            "kv_queries_heldout": len(flat),
            "kv_queries_within_window": int((dist < window).sum()),
            "kv_queries_beyond_window": int((dist >= window).sum()),
        },
        "mix": {
            "synthetic_fraction_of_rows": settings.synthetic_fraction,
            "stdlib_rows": "random crops of seq_len tokens from train_tokens",
            "synthetic_rows": "whole blocks of synthetic_train",
        },
        "split_rule": f"sha256(relative path)[:8] as big-endian int mod 1000 < {settings.heldout_permille} -> heldout",
        "files": [
            {
                "path": f.path,
                "split": f.split,
                "bytes": f.num_bytes,
                "sha256": f.sha256,
                "tokens": len(ids[i]),
                "used": used[i],
                "stream_order": order_pos[i],
            }
            for i, f in enumerate(files)
        ],
        "skipped": list(skipped),
        "corpus_sha256": _file_sha256(out / CORPUS_FILE),
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return manifest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The corpus manifest written by :func:`build_corpus`."""
    return json.loads((Path(out_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
