"""Compact intermediate checkpoints: only the tensors distillation changes, overlaid on a full base checkpoint.

Distillation trains the mixers alone (:func:`.transfer.is_shared` names the frozen rest: embeddings, norms,
MLPs, final norm, LM head), so an intermediate supernet differs from the final one only in its
``model.decoder.blocks.{i}.mixer.mixers.*`` tensors. A *snapshot* directory stores those tensors and what is
needed to rebuild the whole checkpoint from a base that holds the frozen ones (the final supernet, or the
teacher, whose shared tensors are bit-identical to the supernet's):

=========================================  ===============================================================
``snapshot.json``                          format, step, the overlaid tensor names per file, the frozen
                                           tensor names with their SHA-256 fingerprint (the base must match)
``config.json``                            the full checkpoint's Apriel2 config (so the result is a normal
                                           Apriel2 supernet directory)
``overlay[-NNNNN-of-NNNNN].safetensors``   the overlaid tensors (bf16), shards <= 15 MiB
=========================================  ===============================================================

Safetensors and JSON only (no pickle). :func:`load_snapshot` gives a loaded :class:`Supernet` (overlaying in
place on a model already in memory, or building from a base directory); :func:`materialize_snapshot` writes
the normal Apriel2 directory (config + sharded safetensors + tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from placement_search.devnet.tokenizer import TOKENIZER_FILES
from placement_search.devnet.transfer import is_shared
from placement_search.errors import PlacementSearchError
from placement_search.evaluators import Supernet, load_supernet
from placement_search.evaluators.checkpoint import export_config
from placement_search.files import atomic_directory, write_json_atomic

FORMAT = "placement-search-devnet-snapshot/1"
SNAPSHOT_JSON = "snapshot.json"
SHARD_BYTES = 15 * 1024**2
_INDEX = "model.safetensors.index.json"


class SnapshotError(PlacementSearchError):
    """A snapshot that does not fit its base (other frozen tensors, missing tensors) or is malformed."""


def is_snapshot(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / SNAPSHOT_JSON).is_file()


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over ``(name, dtype, shape, bytes)`` of the tensors, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda item: item[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _shard(names: list[str], sizes: Mapping[str, int], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + sizes[name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += sizes[name]
    return shards


def _write_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory with ``fill(tmp)`` and swap it into place atomically (replacing ``path``)."""
    with atomic_directory(path) as tmp:
        fill(tmp)
    return path


def _write_snapshot(
    path: Path,
    overlay: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    config: Mapping[str, Any],
    info: Mapping[str, Any],
) -> Path:
    names = sorted(overlay)
    sizes = {n: overlay[n].numel() * overlay[n].element_size() for n in names}
    shards = _shard(names, sizes, SHARD_BYTES)

    def fill(tmp: Path) -> None:
        files: dict[str, list[str]] = {}
        for k, shard in enumerate(shards):
            file = "overlay.safetensors" if len(shards) == 1 else f"overlay-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: overlay[n] for n in shard}, tmp / file, metadata={"format": "pt"})
            files[file] = shard
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        meta = {
            "format": FORMAT,
            **dict(info),
            "dtype": str(next(iter(overlay.values())).dtype).removeprefix("torch.") if overlay else None,
            "overlay_bytes": sum(sizes.values()),
            "overlay_tensors": len(names),
            "files": files,
            "frozen": {"names": sorted(frozen), "sha256": fingerprint(frozen.items())},
        }
        (tmp / SNAPSHOT_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    return _write_dir(path, fill)


def save_snapshot(
    model: Supernet,
    path: str | os.PathLike[str],
    info: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    frozen: Callable[[str], bool] = is_shared,
) -> Path:
    """Write the tensors of ``model`` that ``frozen`` rejects (the mixers) as a snapshot in ``dtype``.

    The frozen tensors' fingerprint (in ``dtype``) is recorded, so the snapshot can only be overlaid on a base
    whose frozen tensors are these. ``info`` (step, total steps, ...) goes into ``snapshot.json``.
    """
    overlay: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = p.detach().to("cpu", dtype).contiguous()
        (fixed if frozen(name) else overlay)[name] = t
    config = export_config(model)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return _write_snapshot(Path(path), overlay, fixed, config, info or {})


def _checkpoint_files(path: Path) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of an Apriel2 checkpoint directory."""
    if (path / _INDEX).is_file():
        return dict(json.loads((path / _INDEX).read_text(encoding="utf-8"))["weight_map"])
    if not (path / "model.safetensors").is_file():
        raise SnapshotError(f"{path}: no model.safetensors or {_INDEX}")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _read_tensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    files = _checkpoint_files(path)
    wanted = sorted(set(names))
    missing = [n for n in wanted if n not in files]
    if missing:
        raise SnapshotError(f"{path}: missing tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    by_file: dict[str, list[str]] = {}
    for n in wanted:
        by_file.setdefault(files[n], []).append(n)
    out: dict[str, torch.Tensor] = {}
    for file, ns in by_file.items():
        with safe_open(path / file, framework="pt") as f:
            for n in ns:
                out[n] = f.get_tensor(n)
    return out


def snapshot_from_checkpoint(
    checkpoint: str | os.PathLike[str],
    path: str | os.PathLike[str],
    info: Mapping[str, Any] | None = None,
    *,
    frozen: Callable[[str], bool] = is_shared,
) -> Path:
    """The snapshot of a full supernet checkpoint directory (its mixer tensors, as stored)."""
    checkpoint = Path(checkpoint)
    names = list(_checkpoint_files(checkpoint))
    tensors = _read_tensors(checkpoint, names)
    overlay = {n: t for n, t in tensors.items() if not frozen(n)}
    fixed = {n: t for n, t in tensors.items() if frozen(n)}
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return _write_snapshot(Path(path), overlay, fixed, config, info or {})


def read_snapshot_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    meta = json.loads((Path(path) / SNAPSHOT_JSON).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a devnet snapshot (format {meta.get('format')!r})")
    return meta


def _overlay_tensors(path: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file, names in meta["files"].items():
        with safe_open(path / file, framework="pt") as f:
            keys = set(f.keys())
            lost = [n for n in names if n not in keys]
            if lost:
                raise SnapshotError(f"{path / file}: missing tensors {', '.join(lost[:4])}")
            for n in names:
                out[n] = f.get_tensor(n)
    return out


def _check_frozen(meta: Mapping[str, Any], frozen: Mapping[str, torch.Tensor], where: str) -> None:
    dtype = getattr(torch, meta["dtype"]) if meta.get("dtype") else None
    cast = {n: (t.to(dtype) if dtype is not None else t) for n, t in frozen.items()}
    if fingerprint(cast.items()) != meta["frozen"]["sha256"]:
        raise SnapshotError(
            f"{where}: its frozen tensors (embeddings, norms, MLPs, head) are not the ones this snapshot was "
            "taken against; overlay it on the final supernet (or teacher) of the same run"
        )


@torch.no_grad()
def overlay_snapshot(model: Supernet, path: str | os.PathLike[str], *, check_base: bool = True) -> Supernet:
    """Copy the snapshot's tensors into ``model`` in place (any dtype/device); returns ``model``."""
    path = Path(path)
    meta = read_snapshot_meta(path)
    params = dict(model.named_parameters())
    overlay = _overlay_tensors(path, meta)
    unknown = sorted(set(overlay) - set(params))
    if unknown:
        raise SnapshotError(f"{path}: tensors the model lacks: {', '.join(unknown[:4])}")
    if check_base:
        missing = [n for n in meta["frozen"]["names"] if n not in params]
        if missing:
            raise SnapshotError(f"{path}: the model lacks frozen tensors {', '.join(missing[:4])}")
        _check_frozen(meta, {n: params[n] for n in meta["frozen"]["names"]}, "model")
    for name, t in overlay.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise SnapshotError(f"{path}: {name} is {list(t.shape)}, the model's {list(params[name].shape)}")
        params[name].copy_(t)
    return model


def materialize_snapshot(
    path: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str]
) -> Path:
    """Write the normal Apriel2 directory of snapshot ``path`` over checkpoint directory ``base`` to ``out``.

    ``base`` provides the frozen tensors (checked against the snapshot's fingerprint) and the tokenizer files.
    """
    path, base, out = Path(path), Path(base), Path(out)
    meta = read_snapshot_meta(path)
    frozen = _read_tensors(base, meta["frozen"]["names"])
    _check_frozen(meta, frozen, str(base))
    overlay = _overlay_tensors(path, meta)
    tensors = {**frozen, **overlay}
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    names = list(tensors)
    shards = _shard(names, {n: tensors[n].numel() * tensors[n].element_size() for n in names}, SHARD_BYTES)

    def fill(tmp: Path) -> None:
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in shard}, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n", encoding="utf-8")  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        info = {k: v for k, v in meta.items() if k not in ("files", "frozen")}
        write_json_atomic(tmp / "devnet.json", {**info, "materialized_from": path.name})

    return _write_dir(out, fill)


def load_snapshot(
    path: str | os.PathLike[str],
    base: Supernet | str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Supernet:
    """The snapshot as a loaded :class:`Supernet`.

    ``base``: a loaded supernet (overlaid in place and returned; ``device``/``dtype`` ignored) or a checkpoint
    directory holding the frozen tensors (the final supernet or the teacher): then the whole checkpoint is
    materialised in a temporary directory and loaded with :func:`load_supernet`.
    """
    if isinstance(base, Supernet):
        return overlay_snapshot(base, path)
    with tempfile.TemporaryDirectory(prefix="devnet-snapshot-") as tmp:
        full = materialize_snapshot(path, base, Path(tmp) / "checkpoint")
        return load_supernet(full, device=device, dtype=dtype)


def dir_bytes(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0
