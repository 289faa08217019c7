"""devnet corpus: deterministic, file-disjoint split; well-formed synthetic key-value blocks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from placement_search.devnet.config import EOS_TOKEN, CorpusSettings
from placement_search.devnet.corpus import Corpus, build_corpus, kv_blocks, select_files, split_of
from placement_search.devnet.tokenizer import train_tokenizer

CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    '''Doc.'''\n    value = 'abc'\n" * 8


def _fake_stdlib(root: Path) -> None:
    for rel in ["os.py", "json/__init__.py", "json/decoder.py", "email/utils.py", "a/b/c.py", "zz.py",
                "test/test_os.py", "json/tests/t.py", "site-packages/pkg.py", "idlelib/idle_test/x.py",
                "test_thing.py", "huge.py", "tiny.py", "notes.txt"]:  # fmt: skip
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(CODE * (200 if rel == "huge.py" else 1) if rel != "tiny.py" else "x = 1\n")
    (root / "bad.py").write_bytes(b"\xff\xfe" + b"x" * 400)


def test_split_deterministic_and_disjoint(tmp_path: Path):
    _fake_stdlib(tmp_path)
    settings = CorpusSettings(heldout_permille=400, max_file_bytes=20_000, min_file_bytes=64)
    files, skipped = select_files(settings, tmp_path)
    again, _ = select_files(settings, tmp_path)
    paths = [f.path for f in files]
    assert paths == sorted(paths) == [f.path for f in again]
    assert [f.split for f in files] == [f.split for f in again]
    assert set(paths) == {"a/b/c.py", "email/utils.py", "json/__init__.py", "json/decoder.py", "os.py", "zz.py"}
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert "huge.py" in reasons and "tiny.py" in reasons and "bad.py" in reasons and "test_thing.py" in reasons
    assert not any("site-packages" in p or "test/" in p or "tests/" in p or "idle_test" in p for p in paths)
    train = {f.path for f in files if f.split == "train"}
    heldout = {f.path for f in files if f.split == "heldout"}
    assert train and heldout and not train & heldout
    # the split depends on the path alone (same on every machine)
    assert all(split_of(f.path, 400) == f.split for f in files)
    assert split_of("json/decoder.py", 0) == "train" and split_of("json/decoder.py", 1000) == "heldout"
    share = np.mean([split_of(f"mod{i}.py", 50) == "heldout" for i in range(4000)])
    assert 0.035 < share < 0.065


@pytest.fixture(scope="module")
def tokenizer():
    text = CODE + "".join(f"key_{i:04d} = 'abc{i % 100:02d}'\nassert key_{i:04d} == 'xyz'\nn_{i:04d} = {i}\n"
                          for i in range(300))  # fmt: skip
    return train_tokenizer([text], 400)


def _encode(tok):
    return lambda s: tok.encode(s, add_special_tokens=False).ids


def test_kv_blocks_well_formed_and_answers_recoverable(tokenizer):
    eos = tokenizer.token_to_id(EOS_TOKEN)
    length, window = 256, 24
    blocks, queries = kv_blocks(_encode(tokenizer), 6, length, window, eos, seed=3)
    again, _ = kv_blocks(_encode(tokenizer), 6, length, window, eos, seed=3)
    assert blocks.shape == (6, length) and (blocks == again).all() and (blocks[:, 0] == eos).all()
    n_near = n_far = 0
    for b, qs in enumerate(queries):
        ids = blocks[b].tolist()
        text = tokenizer.decode(ids[1:])
        complete = text[: text.rfind("\n") + 1]
        # line-by-line encoding equals encoding the text whole
        assert _encode(tokenizer)(complete) == ids[1 : 1 + len(_encode(tokenizer)(complete))]
        lines = complete.splitlines()
        assert all(re.fullmatch(r"key_\d{4} = '[a-z]{3}\d{2}'|n_\d{4} = \d+|assert key_\d{4} == '[a-z]{3}\d{2}'", ln)
                   for ln in lines)  # fmt: skip
        defs = dict(re.findall(r"^(key_\d{4}) = '(\w+)'$", complete, re.M))
        assert qs
        for q in qs:
            answer = tokenizer.decode(ids[q.answer_start : q.answer_start + q.answer_len])
            defined = tokenizer.decode(ids[q.definition_start : q.definition_start + q.answer_len])
            assert answer == defined and re.fullmatch(r"[a-z]{3}\d{2}", answer)
            before = tokenizer.decode(ids[1 : q.answer_start])
            key = re.search(r"assert (key_\d{4}) == '$", before).group(1)
            assert defs[key] == answer
            assert q.distance > 0
            n_near += q.distance < window
            n_far += q.distance >= window
    assert n_near > 0 and n_far > 0


def test_build_corpus_roundtrip(tmp_path: Path, tokenizer):
    _fake_stdlib(tmp_path / "lib")
    settings = CorpusSettings(heldout_permille=400, max_file_bytes=20_000, min_file_bytes=64, seq_len=64,
                              synthetic_train_blocks=3, synthetic_heldout_blocks=4)  # fmt: skip
    files, skipped = select_files(settings, tmp_path / "lib")
    manifest = build_corpus(files, skipped, tokenizer, settings, 16, tmp_path / "out")
    corpus = Corpus.load(tmp_path / "out" / "corpus.npz")
    assert corpus.train_tokens.dtype == np.uint16 and corpus.synthetic_heldout.shape == (4, 64)
    by_split = {s: [f for f in manifest["files"] if f["split"] == s and f["used"]] for s in ("train", "heldout")}
    assert len(corpus.train_tokens) == sum(f["tokens"] + 1 for f in by_split["train"])
    assert len(corpus.heldout_tokens) == sum(f["tokens"] + 1 for f in by_split["heldout"])
    assert len(corpus.kv_block) == manifest["counts"]["kv_queries_heldout"] > 0
    assert (corpus.kv_distance > 0).all()
