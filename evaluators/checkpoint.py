"""Load and save Apriel2 HF checkpoints (``config.json`` + safetensors), text decoder only.

Reading treats the directory as untrusted: JSON and safetensors only (no pickle). Everything is
checked before any tensor is copied — the index, every shard header (dtype, shape, offsets within the
file size), and the set of names and shapes against the model — and the model is built fresh, so a
failure never leaves a half-loaded model behind. Tensors are then copied shard by shard, one tensor
at a time, into parameters that already live on the target device.

Names: a supernet (stochastic mixer) keeps mixer tensors under
``model.decoder.blocks.{i}.mixer.mixers.{name}.``; a fixed or pattern export (plain mixer) keeps them
directly under ``model.decoder.blocks.{i}.mixer.``. Vision/multimodal tensors are skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from placement_search.errors import PlacementSearchError
from placement_search.evaluators.supernet import PlacementLike, Supernet, mixers_for
from placement_search.files import atomic_directory, load_json
from placement_search.placement import Placement
from placement_search.spec import AttentionSpec, ModelSpec, default_mixer_name

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
DEFAULT_SHARD_BYTES = 5 * 1024**3

#: safetensors dtype codes accepted for parameters, with their item size in bytes.
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
_DTYPE_CODES = {v[0]: k for k, v in _DTYPES.items()}
_MIXER_RE = re.compile(r"^model\.decoder\.blocks\.(\d+)\.mixer\.(?:mixers\.([^.]+)\.)?(.+)$")
_TEXT_PREFIXES = ("model.embed_tokens.", "model.decoder.", "model.norm.", "lm_head.")


class CheckpointError(PlacementSearchError):
    """A checkpoint that cannot be loaded or written (names the file or the tensors)."""


def _names(kind: str, names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} {kind} tensor{'s' if len(names) != 1 else ''} ({shown})"


def _is_multimodal(name: str) -> bool:
    """Vision encoder, projector and other non-text tensors (skipped by this text-only loader)."""
    if name.startswith(_TEXT_PREFIXES):
        return False
    parts = name.split(".")[:-1]
    return any(p.startswith(("vision", "multi_modal", "image", "mm_")) or "projector" in p for p in parts)


# --------------------------------------------------------------------------------------------
# Names


def checkpoint_name(spec: ModelSpec, name: str) -> str:
    """The checkpoint tensor name of supernet parameter ``name`` (plain mixers drop ``mixers.{m}.``)."""
    m = _MIXER_RE.match(name)
    if m and m.group(2) is not None and not spec.layers[int(m.group(1))].stochastic:
        return f"model.decoder.blocks.{m.group(1)}.mixer.{m.group(3)}"
    return name


def _parameters(model: Supernet) -> dict[str, torch.nn.Parameter]:
    """Checkpoint name -> parameter (a tied ``lm_head`` appears once, as the embeddings)."""
    return {checkpoint_name(model.spec, n): p for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# Reading untrusted files


def _load_json(path: Path) -> Any:
    try:
        return load_json(path)
    except PlacementSearchError as e:
        raise CheckpointError(str(e)) from None


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype code, shape) of a safetensors file, after checking every offset against the file size."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: truncated or corrupt safetensors file ({why})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"header length {n} does not fit in {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(x, int) and x >= 0 for x in (*shape, start, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"malformed entry for tensor {name}")
        itemsize = _DTYPES[code][1] if code in _DTYPES else None
        if itemsize is not None and end - start != math.prod(shape) * itemsize:
            raise bad(f"tensor {name} has {end - start} bytes for shape {list(shape)} {code}")
        if not start <= end <= data_len:
            raise bad(f"tensor {name} ends at byte {end} of a {data_len}-byte data section")
        out[name] = (code, shape)
    return out


def _shards(path: Path) -> dict[str, list[str] | None]:
    """Shard file name -> tensor names the index assigns to it (``None`` for a single unindexed file)."""
    index = path / INDEX
    if index.exists():
        data = _load_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{index}: expected an object with a 'weight_map' of tensor name -> file name"
            )
        shards: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            if Path(file).name != file or file in ("", ".", ".."):
                raise CheckpointError(
                    f"{index}: tensor {name} maps to {file!r}, not a file name in the directory"
                )
            shards.setdefault(file, []).append(name)  # type: ignore[union-attr]
        return shards
    if (path / SINGLE).exists():
        return {SINGLE: None}
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}")


def _read_headers(path: Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Tensor name -> (shard file, dtype code, shape) over all shards, checked against the index."""
    tensors: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for file, listed in _shards(path).items():
        header = read_header(path / file)
        if listed is not None:
            missing = sorted(set(listed) - set(header))
            if missing:
                raise CheckpointError(f"{path / file}: lacks {_names('indexed', missing)}")
            header = {k: header[k] for k in listed}  # the index is authoritative, as in HF
        for name, (code, shape) in header.items():
            if name in tensors:
                raise CheckpointError(f"{path / file}: tensor {name} also appears in {tensors[name][0]}")
            tensors[name] = (file, code, shape)
    return tensors


# --------------------------------------------------------------------------------------------
# Loading


def _raw_blocks(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The raw block config of every layer (fixed or pattern decoder)."""
    dec = config["decoder"]
    n = dec["num_blocks"]
    if dec.get("type", "fixed") == "fixed":
        return [dec["block"]] * n
    return [dec["blocks"][dec["pattern"][i % len(dec["pattern"])]] for i in range(n)]


def _raw_mixer(block: Mapping[str, Any], name: str) -> dict[str, Any]:
    mixer = block["mixer"]
    return mixer["mixers"][name] if mixer.get("type") == "stochastic" else mixer


def _trust_bias_tensors(spec: ModelSpec, tensors: Mapping[str, Any]) -> ModelSpec:
    """Attention mixers whose config omits ``add_linear_biases`` get biases when the checkpoint has them."""
    blocks = _raw_blocks(spec.config)
    layers = list(spec.layers)
    for i, layer in enumerate(spec.layers):
        for name, mspec in layer.mixers.items():
            if not isinstance(mspec, AttentionSpec) or mspec.add_linear_biases:
                continue
            if "add_linear_biases" in _raw_mixer(blocks[i], name):
                continue
            prefix = f"model.decoder.blocks.{i}.mixer." + (f"mixers.{name}." if layer.stochastic else "")
            if f"{prefix}q_proj.bias" in tensors:
                warnings.warn(
                    f"layer {i} mixer {name!r}: config omits add_linear_biases; the checkpoint has biases, using them",
                    stacklevel=3,
                )
                mixers = {**layers[i].mixers, name: dataclasses.replace(mspec, add_linear_biases=True)}
                layers[i] = dataclasses.replace(layers[i], mixers=mixers)
    return spec if layers == list(spec.layers) else dataclasses.replace(spec, layers=tuple(layers))


def _default_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_supernet(
    path: str | os.PathLike[str],
    placements: Iterable[PlacementLike] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Supernet:
    """Load an Apriel2 checkpoint directory into a :class:`Supernet`.

    ``placements``: build (thin-load) only the mixers these placements use; ``None`` loads every mixer.
    ``dtype``: parameter dtype; default the config's ``torch_dtype`` (else float32).
    Raises :class:`CheckpointError` naming the file or the missing / unexpected / mis-shaped tensors.
    """
    path = Path(path)
    config = _load_json(path / CONFIG)
    spec = ModelSpec.from_config(config, name=path.name, source=str(path / CONFIG))
    tensors = _read_headers(path)
    spec = _trust_bias_tensors(spec, tensors)
    dtype = dtype or _default_dtype(config)
    built = None if placements is None else mixers_for(spec, placements)

    # Check names and shapes against a model on the meta device (no memory), then build the real one.
    expected = {
        k: tuple(p.shape) for k, p in _parameters(Supernet(spec, built, device="meta", seed=None)).items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected: list[str] = []
    misshaped: list[str] = []
    for name, (_, code, shape) in tensors.items():
        if name in expected:
            if shape != expected[name]:
                misshaped.append(f"{name} {list(shape)} != {list(expected[name])}")
            elif code not in _DTYPES:
                misshaped.append(f"{name} has dtype {code}")
        elif not _skipped(spec, built, name):
            unexpected.append(name)
    problems = [
        _names(kind, sorted(names)) for kind, names in (("missing", missing), ("unexpected", unexpected),
                                                        ("mis-shaped", misshaped)) if names
    ]  # fmt: skip
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))

    model = Supernet(spec, built, device=device, dtype=dtype, seed=None)
    params = _parameters(model)
    by_file: dict[str, list[str]] = {}
    for name in params:
        by_file.setdefault(tensors[name][0], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            try:
                with safe_open(path / file, framework="pt", device="cpu") as f:
                    for name in names:
                        params[name].copy_(f.get_tensor(name))
            except (OSError, RuntimeError, ValueError, SafetensorError) as e:
                raise CheckpointError(f"{path / file}: cannot read tensors ({e})") from None
    model.eval()
    return model


def _skipped(spec: ModelSpec, built: Sequence[frozenset[str]] | None, name: str) -> bool:
    """Tensors the text model does not load: multimodal ones, a tied head, mixers thin loading left out."""
    if _is_multimodal(name) or (name == "lm_head.weight" and spec.tie_word_embeddings):
        return True
    m = _MIXER_RE.match(name)
    if built is None or m is None or m.group(2) is None or int(m.group(1)) >= spec.num_layers:
        return False
    layer = int(m.group(1))
    return (
        spec.layers[layer].stochastic
        and m.group(2) in spec.layers[layer].mixers
        and m.group(2) not in built[layer]
    )


def random_supernet(
    spec: ModelSpec,
    placements: Iterable[PlacementLike] | None = None,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Supernet:
    """A randomly initialised supernet (thin when ``placements`` is given), materialised directly on ``device``."""
    built = None if placements is None else mixers_for(spec, placements)
    return Supernet(spec, built, device=device, dtype=dtype, seed=seed).eval()


# --------------------------------------------------------------------------------------------
# Saving


def _leaf_name_entry(name: str, mixer_cfg: Mapping[str, Any], mspec: Any) -> dict[str, Any]:
    """A plain mixer config; adds ``name`` when the spec parser would not infer it from the type."""
    out = copy.deepcopy(dict(mixer_cfg))
    if default_mixer_name(mspec) != name:
        out["name"] = name
    return out


def _pattern_config(config: Mapping[str, Any], blocks: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """``config`` with a pattern decoder of per-layer ``(preferred block name, block config)``."""
    names: dict[str, str] = {}  # canonical JSON -> block name
    table: dict[str, dict[str, Any]] = {}
    pattern = []
    for preferred, block in blocks:
        key = json.dumps(block, sort_keys=True)
        if key not in names:
            name = preferred if preferred not in table else f"{preferred}_{len(table)}"
            names[key], table[name] = name, block
        pattern.append(names[key])
    out = copy.deepcopy(dict(config))
    out["decoder"] = {"type": "pattern", "num_blocks": len(blocks), "pattern": pattern, "blocks": table}
    return out


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if not k.startswith(("vision", "image", "projector"))}
    if out.get("architectures") == ["Apriel2ForConditionalGeneration"]:
        out["architectures"] = ["Apriel2ForCausalLM"]
        out["model_type"] = "apriel2_text"
    return out


def export_config(model: Supernet, placement: PlacementLike | None = None) -> dict[str, Any]:
    """The config.json that :func:`save_checkpoint` writes (see there)."""
    spec = model.spec
    config = _text_config(spec.config)
    raw = _raw_blocks(config)
    if placement is not None:
        names = Placement.parse(placement, spec.search_space).mixers
        blocks = []
        for i, name in enumerate(names):
            block = copy.deepcopy(raw[i])
            block["mixer"] = _leaf_name_entry(name, _raw_mixer(raw[i], name), spec.mixer(i, name))
            blocks.append((name, block))
        return _pattern_config(config, blocks)
    if all(set(b) == set(layer.mixers) for b, layer in zip(model.built, spec.layers, strict=True)):
        return copy.deepcopy(config)
    blocks = []
    for block_cfg, names in zip(raw, model.built, strict=True):
        block = copy.deepcopy(block_cfg)
        mixer = block["mixer"]
        if mixer.get("type") == "stochastic":
            mixer["mixers"] = {n: mixer["mixers"][n] for n in names}
            if mixer.get("main_mixer_name") not in names:
                mixer["main_mixer_name"] = names[0]
        blocks.append(("+".join(names), block))
    return _pattern_config(config, blocks)


def save_checkpoint(
    model: Supernet,
    path: str | os.PathLike[str],
    *,
    placement: PlacementLike | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``), atomically.

    Without ``placement`` the model is written as it is: the supernet format (a thin model gets a pattern
    config listing only the mixers it holds). With ``placement``, a fixed deployment of that placement: a
    pattern decoder whose block names are the mixer names, plain mixers, tensors directly under ``.mixer.``.
    The directory is assembled beside ``path`` and renamed into place (replacing an existing one).
    """
    path = Path(path)
    chosen = None if placement is None else Placement.parse(placement, model.spec.search_space).mixers
    for i, name in enumerate(chosen or ()):
        if name not in model.built[i]:
            raise CheckpointError(
                f"cannot export placement: layer {i} mixer {name!r} is not loaded in this model"
            )
    config = export_config(model, chosen)
    out_spec = ModelSpec.from_config(config, name=path.name, source="exported config")
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        m = _MIXER_RE.match(name)
        if chosen is not None and m and m.group(2) != chosen[int(m.group(1))]:
            continue  # another layer's mixer than the exported one
        tensors[checkpoint_name(out_spec, name)] = p
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    with atomic_directory(path) as tmp:
        weight_map = {}
        for k, shard in enumerate(shards):
            file = SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            cpu = {n: tensors[n].detach().to("cpu").contiguous() for n in shard}
            save_file(cpu, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            del cpu
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
