"""Load a checkpoint's tokenizer offline (never with ``trust_remote_code``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from placement_search.errors import PlacementSearchError

#: Files any of which lets ``AutoTokenizer`` build a tokenizer without the network.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tekken.json")


class TokenizerError(PlacementSearchError):
    """A tokenizer that is missing or cannot be loaded (names the directory)."""


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``, with one-line errors."""
    p = Path(path)
    if not p.is_dir():
        raise TokenizerError(f"{p}: no such directory")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(f"{p}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers/tokenizers raise many types for a bad file
        raise TokenizerError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
