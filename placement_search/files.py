"""Reading untrusted JSON/YAML files and writing files atomically.

Reads use ``json`` and ``yaml.safe_load`` only. Writes go to a temporary file in the target
directory and are renamed into place, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import yaml

from placement_search.errors import InputFileError

#: Refuse to parse text files larger than this (a placement or preset file is a few kB).
MAX_TEXT_FILE_BYTES = 64 * 1024 * 1024


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file, raising :class:`InputFileError` naming the file on any failure."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_TEXT_FILE_BYTES:
            raise InputFileError(f"{p}: file is {size} bytes, larger than the {MAX_TEXT_FILE_BYTES} allowed")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{p}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise InputFileError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputFileError(f"{p}: cannot read ({e.strerror or e})") from None


def load_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; errors name the file, line and column."""
    text = read_text(path)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except _NonFiniteNumber as e:
        raise InputFileError(f"{path}: invalid JSON: {e} is not a JSON number") from None
    except RecursionError:
        raise InputFileError(f"{path}: invalid JSON: nested too deeply") from None


class _NonFiniteNumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumber(name)


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file with ``yaml.safe_load``; errors name the file and position."""
    text = read_text(path)
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """``yaml.safe_load`` with a one-line error naming ``source``."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise InputFileError(f"{source}: invalid YAML{where}: {e.problem or e}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise InputFileError(f"{source}: invalid YAML: {e}") from None


def load_structured(path: str | os.PathLike[str]) -> Any:
    """Load ``.json`` with json and ``.yaml``/``.yml`` (or anything else) with ``yaml.safe_load``."""
    if str(path).lower().endswith(".json"):
        return load_json(path)
    return load_yaml(path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[TextIO | BinaryIO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error delete it."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_open(path, "w") as f:
        f.write(text)  # type: ignore[arg-type]
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, trailing newline) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a fresh directory beside ``path`` to fill; on success it replaces ``path``, on error it is removed.

    An existing ``path`` is moved aside first and deleted only after the new directory is in place, so a reader
    sees the old directory or the new one, never a half-written one. With ``fsync`` the files written into
    the directory are flushed to disk before the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
