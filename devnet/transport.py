"""Bringing the GPU run's outputs back through the device's limits, and unpacking them here.

What comes back from one device call: at most 8 files of at most 16 MiB, 64 MiB together, in ``$OUT``.
:func:`pack` writes the chosen outputs of a run directory as one gzipped tar cut into parts of at most
``PART_BYTES`` (``NAME.tgz.partNN``) plus ``NAME.json`` (the parts' SHA-256, the files inside, what was left
out). Required entries always go in (an error if they exceed the budget); optional ones (the intermediate
snapshots) go in, in the order given, while the total stays within ``MAX_TOTAL_BYTES``.

The final supernet travels as a snapshot over the teacher (``supernet-delta/``: the mixer tensors; the frozen
tensors are the teacher's, bit for bit, and the teacher came back from the first call), which
:func:`unpack` turns back into the full ``supernet/`` directory.

Unpack here (``FILES_AT`` is the folder the device tool reports)::

    .venv/bin/python -m placement_search.devnet unpack FILES_AT --into results/devnet

or by hand: ``cat FILES_AT/NAME.tgz.part* | tar -xzf - -C results/devnet``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from placement_search.errors import PlacementSearchError
from placement_search.files import write_json_atomic

MiB = 1024**2
PART_BYTES = 15 * MiB
MAX_FILES = 8
MAX_TOTAL_BYTES = 62 * MiB  # 64 MiB come back; a little room for the manifest and rounding
FINAL_DELTA = "supernet-delta"


class TransportError(PlacementSearchError):
    """Outputs that cannot fit the device's return limits, or parts that do not check out."""


def _files(root: Path, entry: str) -> list[Path]:
    p = root / entry
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return []


class _Counter(io.RawIOBase):
    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.n += len(b)
        return len(b)


def _tar(root: Path, files: Sequence[Path], fileobj: Any, level: int) -> None:
    with gzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=level, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:  # fmt: skip
        for f in files:
            info = tar.gettarinfo(str(f), arcname=f.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(f, "rb") as fh:
                tar.addfile(info, fh)


def compressed_size(root: Path, files: Sequence[Path], level: int = 6) -> int:
    counter = _Counter()
    _tar(root, files, counter, level)
    return counter.n


class _PartWriter(io.RawIOBase):
    """Writes a byte stream as ``prefix.partNN`` files of at most ``limit`` bytes."""

    def __init__(self, prefix: Path, limit: int) -> None:
        self.prefix, self.limit = prefix, limit
        self.paths: list[Path] = []
        self.fh: Any = None
        self.left = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = memoryview(b).cast("B")
        done = 0
        while done < len(data):
            if self.fh is None or self.left == 0:
                if self.fh is not None:
                    self.fh.close()
                path = self.prefix.parent / f"{self.prefix.name}.part{len(self.paths):02d}"
                self.fh = open(path, "wb")  # noqa: SIM115
                self.paths.append(path)
                self.left = self.limit
            n = min(self.left, len(data) - done)
            self.fh.write(data[done : done + n])
            self.left -= n
            done += n
        return len(data)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        super().close()


def pack(
    root: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    name: str,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    part_bytes: int = PART_BYTES,
    max_total: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
    level: int = 6,
) -> dict[str, Any]:
    """Pack ``required`` (+ as many ``optional``) entries of ``root`` into ``dest``; returns the manifest."""
    root, dest = Path(root), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    missing = []
    for entry in required:
        found = _files(root, entry)
        if not found:
            missing.append(entry)
        files += found
    if missing:
        raise TransportError(f"{root}: nothing to pack for required {', '.join(missing)}")
    total = compressed_size(root, files, level)
    if total > max_total:
        raise TransportError(f"required outputs compress to {total / MiB:.1f} MiB, over {max_total / MiB:.0f} MiB")
    taken, left_out = [], []
    for entry in optional:
        found = _files(root, entry)
        if not found:
            continue
        size = compressed_size(root, found, level)
        if total + size <= max_total:
            files += found
            total += size
            taken.append(entry)
        else:
            left_out.append({"entry": entry, "compressed_bytes": size})
    writer = _PartWriter(dest / f"{name}.tgz", part_bytes)
    _tar(root, files, writer, level)
    writer.close()
    parts = writer.paths
    if len(parts) + 1 > max_files:
        raise TransportError(f"{len(parts)} parts + manifest exceed {max_files} files; raise part_bytes")
    manifest = {
        "name": name,
        "parts": [{"file": p.name, "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in parts],
        "total_bytes": sum(p.stat().st_size for p in parts),
        "files": [f.relative_to(root).as_posix() for f in files],
        "optional_taken": taken,
        "optional_left_out": left_out,
        "unpack": f"cat {name}.tgz.part* | tar -xzf - -C results/devnet",
    }
    write_json_atomic(dest / f"{name}.json", manifest)
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        p = Path(m.name)
        if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
            raise TransportError(f"refusing archive member {m.name!r}")
    return members


def unpack(src: str | os.PathLike[str], into: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Check and extract every ``*.json`` + ``*.tgz.partNN`` set in ``src`` into ``into``; rebuild the final.

    After extraction, a ``supernet-delta/`` snapshot is materialised over ``into/teacher`` as ``into/supernet``
    (and removed). Returns the manifests.
    """
    src, into = Path(src), Path(into)
    manifests = []
    for mpath in sorted(src.glob("*.json")):
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if "parts" not in manifest:
            continue
        stream = io.BytesIO()
        for part in manifest["parts"]:
            p = src / part["file"]
            if not p.is_file() or _sha256(p) != part["sha256"]:
                raise TransportError(f"{p}: missing or its SHA-256 differs from {mpath.name}'s")
            stream.write(p.read_bytes())
        stream.seek(0)
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=stream, mode="r:gz") as tar:
            members = _safe_members(tar)
            # whole checkpoint directories are replaced, never merged into stale ones
            for top in {Path(m.name).parts[0] for m in members if len(Path(m.name).parts) > 1}:
                if (into / top).is_dir():
                    shutil.rmtree(into / top)
            tar.extractall(into, members=members, filter="data")
        manifests.append(manifest)
    if not manifests:
        raise TransportError(f"{src}: no pack manifest (*.json with 'parts')")
    delta = into / FINAL_DELTA
    if delta.is_dir():
        from placement_search.devnet.snapshots import materialize_snapshot

        if not (into / "teacher" / "config.json").is_file():
            raise TransportError(f"{into}: {FINAL_DELTA}/ needs the teacher (unpack the first call's files first)")
        materialize_snapshot(delta, into / "teacher", into / "supernet")
        shutil.rmtree(delta)
    return manifests
