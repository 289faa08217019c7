"""Preset files: the placements a server loads, one per speed level, with their figures.

The on-disk format is JSON, versioned, and written down as a JSON Schema
(``placement_search/schemas/presets-v1.schema.json``). Every read and every write is validated
against that schema and then checked for consistency (each preset's mixers fit the file's search
space, its counts and code agree with its mixers, names are unique). Errors are one line naming
the file and the JSON path of the culprit.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from placement_search._version import __version__
from placement_search.errors import PlacementError, PresetError
from placement_search.files import load_json, write_json_atomic
from placement_search.placement import Placement, SearchSpace
from placement_search.spec import ModelSpec

FORMAT = "placement-search/presets"
FORMAT_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "presets-v1.schema.json"


@cache
def schema() -> dict[str, Any]:
    """The preset file JSON Schema (draft 2020-12)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


# --------------------------------------------------------------------------------------------
# Figures and conditions


@dataclass(frozen=True)
class Quality:
    """A quality figure: ``value`` of ``metric`` with optional ``std`` and central ``interval``."""

    metric: str
    value: float
    std: float | None = None
    interval: tuple[float, float] | None = None
    interval_level: float | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "value": self.value}
        for key in ("std", "interval_level", "source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.interval is not None:
            out["interval"] = list(self.interval)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Quality:
        interval = d.get("interval")
        return cls(
            metric=d["metric"],
            value=float(d["value"]),
            std=d.get("std"),
            interval=None if interval is None else (float(interval[0]), float(interval[1])),
            interval_level=d.get("interval_level"),
            source=d.get("source"),
        )


@dataclass(frozen=True)
class Throughput:
    """Decode throughput (tokens/s over the batch) and speed-up over all-attention."""

    tokens_per_s: float
    speedup: float | None = None
    std: float | None = None
    batch: int | None = None
    step_time_ms: float | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens_per_s": self.tokens_per_s}
        for key in ("speedup", "std", "batch", "step_time_ms", "source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Throughput:
        return cls(
            tokens_per_s=float(d["tokens_per_s"]),
            speedup=d.get("speedup"),
            std=d.get("std"),
            batch=d.get("batch"),
            step_time_ms=d.get("step_time_ms"),
            source=d.get("source"),
        )


@dataclass(frozen=True)
class Figures:
    quality: Quality | None = None
    throughput: Throughput | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "quality": None if self.quality is None else self.quality.to_dict(),
            "throughput": None if self.throughput is None else self.throughput.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Figures:
        d = d or {}
        q, t = d.get("quality"), d.get("throughput")
        return cls(None if q is None else Quality.from_dict(q), None if t is None else Throughput.from_dict(t))


@dataclass(frozen=True)
class BatchPolicy:
    """``fixed`` batch, or ``max_fit``: the largest batch the memory budget allows, optionally capped."""

    kind: str = "max_fit"
    batch: int | None = None
    cap: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "fixed":
            if not isinstance(self.batch, int) or self.batch < 1:
                raise PresetError(f"batch policy 'fixed' needs a batch >= 1, got {self.batch!r}")
        elif self.kind == "max_fit":
            if self.cap is not None and (not isinstance(self.cap, int) or self.cap < 1):
                raise PresetError(f"batch policy 'max_fit' cap must be >= 1, got {self.cap!r}")
        else:
            raise PresetError(f"unknown batch policy {self.kind!r}; use fixed or max_fit")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "fixed":
            return {"kind": "fixed", "batch": self.batch}
        return {"kind": "max_fit", "cap": self.cap}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BatchPolicy:
        return cls(kind=d["kind"], batch=d.get("batch"), cap=d.get("cap"))

    @classmethod
    def parse(cls, text: str) -> BatchPolicy:
        """``"max_fit"``, ``"max_fit:64"`` (capped) or ``"fixed:16"``."""
        kind, _, arg = text.strip().partition(":")
        try:
            n = int(arg) if arg else None
        except ValueError:
            raise PresetError(f"batch policy {text!r}: {arg!r} is not an integer") from None
        if kind == "fixed":
            return cls("fixed", batch=n)
        if kind in ("max_fit", "max-fit", "max"):
            return cls("max_fit", cap=n)
        raise PresetError(f"batch policy {text!r}: use max_fit, max_fit:CAP or fixed:BATCH")

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.batch}"
        return "max_fit" if self.cap is None else f"max_fit:{self.cap}"


@dataclass(frozen=True)
class Conditions:
    """What a throughput figure holds under: context length, batch policy, GPU, memory budget."""

    context_length: int
    batch_policy: BatchPolicy
    gpu: str
    memory_budget_gib: float | None = None
    dtype: str | None = "bfloat16"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "context_length": self.context_length,
            "batch_policy": self.batch_policy.to_dict(),
            "gpu": self.gpu,
        }
        if self.memory_budget_gib is not None:
            out["memory_budget_gib"] = self.memory_budget_gib
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Conditions:
        return cls(
            context_length=d["context_length"],
            batch_policy=BatchPolicy.from_dict(d["batch_policy"]),
            gpu=d["gpu"],
            memory_budget_gib=d.get("memory_budget_gib"),
            dtype=d.get("dtype"),
        )


# --------------------------------------------------------------------------------------------
# Presets and the file


@dataclass(frozen=True)
class Preset:
    """One named placement with the speed level it targets and its figures."""

    name: str
    placement: Placement
    speed_level: float | None
    predicted: Figures = field(default_factory=Figures)
    conditions: Conditions | None = None
    measured: Figures | None = None
    notes: str | None = None

    @property
    def mixers(self) -> tuple[str, ...]:
        return self.placement.mixers

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "mixers": self.placement.as_list(),
            "code": self.placement.code(),
            "counts": self.placement.counts(),
            "speed_level": self.speed_level,
            "predicted": self.predicted.to_dict(),
            "measured": None if self.measured is None else self.measured.to_dict(),
            "conditions": None if self.conditions is None else self.conditions.to_dict(),
        }
        if self.notes is not None:
            out["notes"] = self.notes
        return out


@dataclass(frozen=True)
class PresetFile:
    """A model's identity, its search space, its presets and their provenance."""

    model_name: str
    config_hash: str
    space: SearchSpace
    presets: tuple[Preset, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [p.name for p in self.presets]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise PresetError(f"two presets are named {dup!r}")
        if not self.presets:
            raise PresetError("a preset file needs at least one preset")

    @classmethod
    def create(
        cls,
        spec: ModelSpec,
        presets: Iterable[Preset],
        *,
        command: str | None = None,
        data: Sequence[Mapping[str, Any]] = (),
        **provenance: Any,
    ) -> PresetFile:
        """A new file for ``spec`` with provenance filled in (tool, version, date, command, data)."""
        prov: dict[str, Any] = {
            "tool": "placement-search",
            "tool_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
            "command": command,
            "data": [dict(d) for d in data],
        }
        prov.update(provenance)
        return cls(spec.name, spec.config_hash, spec.search_space, tuple(presets), prov)

    def __getitem__(self, name: str) -> Preset:
        for p in self.presets:
            if p.name == name:
                return p
        raise PresetError(f"no preset named {name!r}; presets: {', '.join(p.name for p in self.presets)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "config_hash": self.config_hash, "num_layers": self.space.num_layers},
            "search_space": self.space.to_dict(),
            "presets": [p.to_dict() for p in self.presets],
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "preset file") -> PresetFile:
        """Validate ``data`` against the schema and the consistency rules, then build the file."""
        validate_preset_data(data, source)
        try:
            space = SearchSpace.from_dict(data["search_space"])
        except PlacementError as e:
            raise PresetError(f"{source}: search_space: {e}") from None
        if data["model"]["num_layers"] != space.num_layers:
            raise PresetError(
                f"{source}: model.num_layers is {data['model']['num_layers']} but search_space.num_layers is "
                f"{space.num_layers}"
            )
        presets = []
        for i, p in enumerate(data["presets"]):
            where = f"{source}: presets[{i}] ({p['name']!r})"
            try:
                placement = Placement(p["mixers"], space)
            except PlacementError as e:
                raise PresetError(f"{where}: {e}") from None
            if list(placement.mixers) != p["mixers"]:
                bad = next(j for j, (a, b) in enumerate(zip(placement.mixers, p["mixers"], strict=True)) if a != b)
                raise PresetError(f"{where}: layer {bad}: write the canonical name {placement.mixers[bad]!r}, not {p['mixers'][bad]!r}")
            counts = placement.counts()
            if {k: v for k, v in p["counts"].items()} != counts:
                raise PresetError(f"{where}: counts {p['counts']} do not match its mixers ({placement.counts_string()})")
            if "code" in p and p["code"] != placement.code():
                raise PresetError(f"{where}: code {p['code']!r} does not match its mixers ({placement.code()})")
            pred = p["predicted"]
            for kind in ("predicted", "measured"):
                q = (p.get(kind) or {}).get("quality")
                if q is not None and q.get("interval") is not None and q["interval"][0] > q["interval"][1]:
                    raise PresetError(f"{where}: {kind}.quality.interval {q['interval']} has lower > upper")
            conditions = None
            if p.get("conditions") is not None:
                try:
                    conditions = Conditions.from_dict(p["conditions"])
                except PresetError as e:
                    raise PresetError(f"{where}: conditions: {e}") from None
            has_throughput = any((p.get(k) or {}).get("throughput") for k in ("predicted", "measured"))
            if has_throughput and conditions is None:
                raise PresetError(f"{where}: has a throughput figure but no conditions (context, batch policy, GPU)")
            presets.append(
                Preset(
                    name=p["name"],
                    placement=placement,
                    speed_level=p["speed_level"],
                    predicted=Figures.from_dict(pred),
                    conditions=conditions,
                    measured=None if p.get("measured") is None else Figures.from_dict(p["measured"]),
                    notes=p.get("notes"),
                )
            )
        try:
            return cls(data["model"]["name"], data["model"]["config_hash"], space, tuple(presets), data["provenance"])
        except PresetError as e:
            raise PresetError(f"{source}: {e}") from None


def validate_preset_data(data: Any, source: str = "preset file") -> None:
    """Raise :class:`PresetError` naming the JSON path of the first schema violation."""
    err = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if err is not None:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path).lstrip(".")
        msg = err.message
        if len(msg) > 160:
            msg = msg[:157] + "..."
        raise PresetError(f"{source}: {path or '(top level)'}: {msg}")


def read_presets(path: str | os.PathLike[str]) -> PresetFile:
    """Read and validate a preset JSON file."""
    return PresetFile.from_dict(load_json(path), source=str(path))


def write_presets(preset_file: PresetFile, path: str | os.PathLike[str]) -> Path:
    """Validate and write a preset JSON file atomically."""
    data = preset_file.to_dict()
    PresetFile.from_dict(data, source=str(path))  # the same checks as on read
    return write_json_atomic(path, data)


def is_preset_data(data: Any) -> bool:
    """Whether parsed JSON claims to be a preset file (has the format marker)."""
    return isinstance(data, Mapping) and data.get("format") == FORMAT
