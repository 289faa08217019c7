"""load_tokenizer: offline loading of a tiny tokenizer built here, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from placement_search.evaluators import TokenizerError, load_tokenizer


def _write_tiny_tokenizer(path: Path) -> None:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog sat on a log"], trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_tiny_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    ids = tok("the dog sat")["input_ids"]
    assert len(ids) == 3 and tok.convert_tokens_to_ids("<unk>") not in ids
    assert tok.decode(ids) == "the dog sat"
    assert tok.eos_token == "</s>"
    assert tok("zebra")["input_ids"] == [tok.convert_tokens_to_ids("<unk>")]


def test_missing_files_give_one_line_errors(tmp_path: Path):
    with pytest.raises(TokenizerError, match="no such directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty: no tokenizer files \(expected one of tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad: cannot load the tokenizer") as info:
        load_tokenizer(bad)
    assert "\n" not in str(info.value)
