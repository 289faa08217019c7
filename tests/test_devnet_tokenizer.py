"""devnet tokenizer: byte-level round trip, offline AutoTokenizer loading through the runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from placement_search.devnet.config import EOS_TOKEN
from placement_search.devnet.tokenizer import encode, load_tokenizer_json, save_tokenizer, train_tokenizer
from placement_search.evaluators import load_tokenizer

TEXT = "import os\n\ndef main(argv):\n    return os.path.join(*argv)  # comment\n" * 20


def test_roundtrip_and_autotokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = train_tokenizer([TEXT], 320, min_frequency=1)
    assert tok.get_vocab_size() <= 320 and tok.token_to_id(EOS_TOKEN) == 0
    for text in (TEXT, "naïve ünïcode → 你好 \t\r\n  x", "key_0173 = 'qzv41'\n"):
        assert tok.decode(encode(tok, text)) == text
    save_tokenizer(tok, tmp_path / "tok", model_max_length=512)
    assert encode(load_tokenizer_json(tmp_path / "tok"), TEXT) == encode(tok, TEXT)
    hf = load_tokenizer(tmp_path / "tok")
    ids = hf(TEXT)["input_ids"]
    assert ids == encode(tok, TEXT)
    assert hf.decode(ids) == TEXT
    assert hf.eos_token == EOS_TOKEN and hf.eos_token_id == 0
