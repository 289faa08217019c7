"""Placements: one mixer name per layer, over a search space.

A :class:`SearchSpace` says how many layers a model has and which mixers each layer offers
(``attention``, ``sliding_window``, ``gdn``, ``kda`` for Super Apriel, but any names work). It also
defines one letter per mixer for the compact code (``A``, ``S``, ``G``, ``K`` by default).

A :class:`Placement` is an immutable tuple of mixer names, one per layer, checked against its
space. It parses from a list of names, a comma-separated string (``attention*24,gdn*24`` repeats
a name), a compact letter code (``AAGK...``), a JSON file or a Fast-LLM placement YAML. It offers
mixer counts, the ``[N, M]`` one-hot matrix the surrogates learn from, a canonical string and a
stable hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from placement_search.errors import PlacementError

#: Accepted spellings of the released mixer names (lower-cased before lookup).
ALIASES: dict[str, str] = {
    "fa": "attention",
    "attn": "attention",
    "full": "attention",
    "full_attention": "attention",
    "swa": "sliding_window",
    "sliding": "sliding_window",
    "sliding-window": "sliding_window",
    "gated_delta_net": "gdn",
    "gated-delta-net": "gdn",
    "kimi_delta_attention": "kda",
    "kimi_linear_attention": "kda",
}

#: Default one-letter codes of the released mixer names.
DEFAULT_LETTERS: dict[str, str] = {"attention": "A", "sliding_window": "S", "gdn": "G", "kda": "K"}

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_REPEAT_RE = re.compile(r"^(?P<name>[^*\s]+)\s*\*\s*(?P<count>\d+)$")
#: Upper bound on layers, so that a typo like ``attention*10000000`` fails fast.
MAX_LAYERS = 4096


def _short(value: Any, limit: int = 40) -> str:
    """``repr`` of a value cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class SearchSpace:
    """The layers of a model and the mixers each offers.

    Parameters
    ----------
    num_layers:
        Number of decoder layers ``N``.
    mixers:
        Every mixer name, in a fixed order (the columns of the one-hot matrix, ``M`` of them).
    allowed:
        Per layer, the names offered there; ``None`` means every layer offers every mixer.
    letters:
        One distinct letter per mixer for the compact code; defaults to :data:`DEFAULT_LETTERS`,
        then the first free letter of each name.
    """

    num_layers: int
    mixers: tuple[str, ...]
    allowed: tuple[frozenset[str], ...] | None = None
    letters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool):
            raise PlacementError(f"search space: num_layers must be an integer, got {_short(self.num_layers)}")
        if not 1 <= self.num_layers <= MAX_LAYERS:
            raise PlacementError(f"search space: num_layers must be in 1..{MAX_LAYERS}, got {self.num_layers}")
        mixers = tuple(self.mixers)
        if not mixers:
            raise PlacementError("search space: no mixers given")
        for name in mixers:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise PlacementError(f"search space: invalid mixer name {_short(name)}")
        if len(set(mixers)) != len(mixers):
            raise PlacementError(f"search space: duplicate mixer names in {list(mixers)}")
        object.__setattr__(self, "mixers", mixers)
        if self.allowed is not None:
            allowed = tuple(frozenset(a) for a in self.allowed)
            if len(allowed) != self.num_layers:
                raise PlacementError(
                    f"search space: allowed mixers given for {len(allowed)} layers, expected {self.num_layers}"
                )
            for i, names in enumerate(allowed):
                if not names:
                    raise PlacementError(f"search space: layer {i} offers no mixer")
                unknown = sorted(names - set(mixers))
                if unknown:
                    raise PlacementError(f"search space: layer {i} offers unknown mixer {unknown[0]!r}")
            if all(a == frozenset(mixers) for a in allowed):
                allowed = None
            object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "letters", _assign_letters(mixers, dict(self.letters)))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def uniform(
        cls, num_layers: int, mixers: Sequence[str], letters: Mapping[str, str] | None = None
    ) -> SearchSpace:
        """A space where every layer offers every mixer."""
        return cls(num_layers, tuple(mixers), None, dict(letters or {}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (used by preset files)."""
        out: dict[str, Any] = {
            "num_layers": self.num_layers,
            "mixers": list(self.mixers),
            "letters": dict(self.letters),
        }
        if self.allowed is not None:
            out["allowed"] = [[m for m in self.mixers if m in a] for a in self.allowed]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise PlacementError(f"search space: expected an object, got {_short(data)}")
        try:
            num_layers = data["num_layers"]
            mixers = data["mixers"]
        except KeyError as e:
            raise PlacementError(f"search space: missing key {e.args[0]!r}") from None
        if not isinstance(mixers, list):
            raise PlacementError(f"search space: 'mixers' must be a list, got {_short(mixers)}")
        allowed = data.get("allowed")
        if allowed is not None and (
            not isinstance(allowed, list) or not all(isinstance(a, list) for a in allowed)
        ):
            raise PlacementError("search space: 'allowed' must be a list of lists of mixer names")
        letters = data.get("letters") or {}
        if not isinstance(letters, Mapping):
            raise PlacementError(f"search space: 'letters' must be an object, got {_short(letters)}")
        return cls(num_layers, tuple(mixers), None if allowed is None else tuple(allowed), dict(letters))

    # -- queries --------------------------------------------------------------------------------

    @property
    def num_mixers(self) -> int:
        return len(self.mixers)

    def allowed_at(self, layer: int) -> tuple[str, ...]:
        """Mixer names offered at ``layer``, in space order."""
        if self.allowed is None:
            return self.mixers
        return tuple(m for m in self.mixers if m in self.allowed[layer])

    def index(self, name: str) -> int:
        """Column of mixer ``name`` in the one-hot matrix."""
        try:
            return self.mixers.index(name)
        except ValueError:
            raise PlacementError(f"unknown mixer {name!r}; valid: {', '.join(self.mixers)}") from None

    def size(self) -> int:
        """Number of placements in the space."""
        total = 1
        for i in range(self.num_layers):
            total *= len(self.allowed_at(i))
        return total

    def resolve(self, token: Any, layer: int) -> str:
        """Canonical mixer name for ``token`` at ``layer`` (accepts aliases, letters, any case)."""
        if not isinstance(token, str):
            raise PlacementError(
                f"layer {layer}: mixer must be a name, got {_short(token)}; valid: {', '.join(self.allowed_at(layer))}"
            )
        raw = token.strip()
        name = self._lookup(raw)
        if name is None:
            raise PlacementError(
                f"layer {layer}: unknown mixer {_short(raw)}; valid: {', '.join(self.allowed_at(layer))}"
            )
        if self.allowed is not None and name not in self.allowed[layer]:
            raise PlacementError(
                f"layer {layer}: mixer {name!r} is not offered here; valid: {', '.join(self.allowed_at(layer))}"
            )
        return name

    def _lookup(self, raw: str) -> str | None:
        if raw in self.mixers:
            return raw
        low = raw.lower()
        for name in self.mixers:
            if name.lower() == low:
                return name
        alias = ALIASES.get(low)
        if alias is not None and alias in self.mixers:
            return alias
        if len(raw) == 1:
            for name, letter in self.letters.items():
                if letter == raw.upper():
                    return name
        return None

    def from_letter(self, letter: str) -> str | None:
        for name, code in self.letters.items():
            if code == letter.upper():
                return name
        return None


def _assign_letters(mixers: tuple[str, ...], given: dict[str, str]) -> dict[str, str]:
    letters: dict[str, str] = {}
    used: set[str] = set()
    for name, letter in given.items():
        if name not in mixers:
            raise PlacementError(f"search space: letter given for unknown mixer {name!r}")
        if not isinstance(letter, str) or len(letter) != 1 or not letter.isalpha():
            raise PlacementError(f"search space: letter of {name!r} must be one letter, got {_short(letter)}")
        letter = letter.upper()
        if letter in used:
            raise PlacementError(f"search space: letter {letter!r} given to two mixers")
        letters[name] = letter
        used.add(letter)
    for name in mixers:
        if name in letters:
            continue
        candidates = [DEFAULT_LETTERS.get(name, "")] + [c.upper() for c in name if c.isalpha()]
        candidates += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
        letter = next((c for c in candidates if c and c not in used), None)
        if letter is None:
            raise PlacementError(f"search space: no free letter for mixer {name!r} (more than 26 mixers)")
        letters[name] = letter
        used.add(letter)
    return {name: letters[name] for name in mixers}


class Placement:
    """An immutable choice of one mixer per layer.

    >>> space = SearchSpace.uniform(4, ["attention", "sliding_window", "gdn", "kda"])
    >>> p = Placement.parse("AGSK", space)
    >>> p.mixers
    ('attention', 'gdn', 'sliding_window', 'kda')
    >>> p.counts()["gdn"]
    1
    """

    __slots__ = ("_hash", "mixers", "space")

    space: SearchSpace
    mixers: tuple[str, ...]

    def __init__(self, mixers: Iterable[Any], space: SearchSpace) -> None:
        items = list(mixers)
        if len(items) != space.num_layers:
            raise PlacementError(f"placement has {len(items)} layers, expected {space.num_layers}")
        names = tuple(space.resolve(tok, i) for i, tok in enumerate(items))
        object.__setattr__(self, "space", space)
        object.__setattr__(self, "mixers", names)
        object.__setattr__(self, "_hash", hash(names))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Placement is immutable")

    # -- parsing --------------------------------------------------------------------------------

    @classmethod
    def parse(cls, value: Any, space: SearchSpace) -> Placement:
        """Parse a list of names, a string (comma list, compact code or file path) or a mapping."""
        if isinstance(value, Placement):
            return cls(value.mixers, space)
        if isinstance(value, os.PathLike):
            return cls.from_file(value, space)
        if isinstance(value, str):
            return cls.from_string(value, space)
        if isinstance(value, Mapping):
            return cls.from_mapping(value, space)
        if isinstance(value, (list, tuple)):
            return cls(value, space)
        raise PlacementError(f"cannot read a placement from {type(value).__name__} {_short(value)}")

    @classmethod
    def from_string(cls, text: str, space: SearchSpace) -> Placement:
        """Parse ``"attention,gdn,..."``, ``"attention*47,kda"``, a compact code, or a file path."""
        raw = text.strip()
        if not raw:
            raise PlacementError("empty placement string")
        if raw[0] in "[{":
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PlacementError(f"placement string: invalid JSON at column {e.colno}: {e.msg}") from None
            return cls.parse(data, space)
        if raw.lower().endswith((".json", ".yaml", ".yml")) or os.sep in raw:
            return cls.from_file(raw, space)
        if "," in raw or "*" in raw:
            return cls(_expand_tokens(raw.split(","), space), space)
        compact = re.sub(r"[\s_|]", "", raw)
        if compact.isalpha() and all(space.from_letter(c) is not None for c in compact):
            if len(compact) != space.num_layers:
                raise PlacementError(f"placement code has {len(compact)} layers, expected {space.num_layers}")
            return cls(list(compact), space)
        if space.num_layers == 1:
            return cls([raw], space)
        bad = next((c for c in compact if not c.isalpha() or space.from_letter(c) is None), compact[:1])
        raise PlacementError(
            f"cannot read placement {_short(raw)}: not a comma-separated list, and {bad!r} is not a mixer letter "
            f"({', '.join(f'{v}={k}' for k, v in space.letters.items())})"
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], space: SearchSpace) -> Placement:
        """Read ``{"layers": [...]}``, ``{"placement": [...]}`` or a one-item ``{"placements": [[...]]}``."""
        placements = placements_from_data(data, space, source="placement")
        if len(placements) != 1:
            raise PlacementError(f"placement: expected one placement, found {len(placements)}")
        return placements[0]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], space: SearchSpace) -> Placement:
        """Read a JSON or Fast-LLM YAML file holding exactly one placement."""
        placements = load_placements(path, space)
        if len(placements) != 1:
            raise PlacementError(f"{path}: expected one placement, found {len(placements)}")
        return placements[0]

    @classmethod
    def uniform(cls, name: str, space: SearchSpace) -> Placement:
        """Every layer uses ``name``."""
        return cls([name] * space.num_layers, space)

    # -- views ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.mixers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.mixers)

    def __getitem__(self, layer: int) -> str:
        return self.mixers[layer]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self.mixers == other.mixers

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Placement({self.code()!r})"

    def __str__(self) -> str:
        return self.code()

    def as_list(self) -> list[str]:
        return list(self.mixers)

    def code(self) -> str:
        """Compact letter code, one letter per layer (the canonical string)."""
        return "".join(self.space.letters[m] for m in self.mixers)

    def to_string(self, style: str = "code") -> str:
        """``"code"`` (compact letters), ``"names"`` (comma-separated) or ``"runs"`` (``name*k`` runs)."""
        if style == "code":
            return self.code()
        if style == "names":
            return ",".join(self.mixers)
        if style == "runs":
            runs: list[str] = []
            for name, count in self.runs():
                runs.append(name if count == 1 else f"{name}*{count}")
            return ",".join(runs)
        raise ValueError(f"unknown style {style!r}: use code, names or runs")

    def runs(self) -> list[tuple[str, int]]:
        """Consecutive runs of the same mixer as ``(name, length)``."""
        out: list[tuple[str, int]] = []
        for name in self.mixers:
            if out and out[-1][0] == name:
                out[-1] = (name, out[-1][1] + 1)
            else:
                out.append((name, 1))
        return out

    @property
    def key(self) -> str:
        """Stable 16-hex-digit hash of the mixer names (same on every machine and Python run)."""
        return hashlib.sha256(",".join(self.mixers).encode()).hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        """Layers per mixer, for every mixer of the space (zeros included), in space order."""
        out = dict.fromkeys(self.space.mixers, 0)
        for name in self.mixers:
            out[name] += 1
        return out

    def counts_string(self) -> str:
        """``"attention=24 gdn=24"`` (mixers with zero layers left out)."""
        return " ".join(f"{k}={v}" for k, v in self.counts().items() if v)

    def indices(self) -> np.ndarray:
        """Column index of each layer's mixer, shape ``[N]``, int64."""
        lookup = {m: i for i, m in enumerate(self.space.mixers)}
        return np.fromiter((lookup[m] for m in self.mixers), dtype=np.int64, count=len(self.mixers))

    def one_hot(self, dtype: Any = np.float32) -> np.ndarray:
        """The ``[N, M]`` one-hot assignment matrix (rows layers, columns ``space.mixers``)."""
        out = np.zeros((self.space.num_layers, self.space.num_mixers), dtype=dtype)
        out[np.arange(self.space.num_layers), self.indices()] = 1
        return out

    def replace(self, layer: int, name: str) -> Placement:
        """A copy with ``layer`` switched to ``name``."""
        items = list(self.mixers)
        items[layer] = name
        return Placement(items, self.space)


def one_hot_matrix(placements: Sequence[Placement], dtype: Any = np.float32) -> np.ndarray:
    """Stack placements into ``[P, N*M]`` features (layer-major, columns ``l*M + m``)."""
    if not placements:
        raise PlacementError("no placements given")
    space = placements[0].space
    idx = np.stack([p.indices() for p in placements])  # [P, N]
    out = np.zeros((len(placements), space.num_layers, space.num_mixers), dtype=dtype)
    rows = np.arange(len(placements))[:, None]
    out[rows, np.arange(space.num_layers)[None, :], idx] = 1
    return out.reshape(len(placements), -1)


def _expand_tokens(tokens: Sequence[str], space: SearchSpace) -> list[str]:
    out: list[str] = []
    for tok in tokens:
        tok = tok.strip()
        m = _REPEAT_RE.match(tok)
        if m:
            count = int(m.group("count"))
            if count > MAX_LAYERS:
                raise PlacementError(f"repeat count {count} in {_short(tok)} is larger than {MAX_LAYERS}")
            out.extend([m.group("name")] * count)
        elif "*" in tok:
            raise PlacementError(f"cannot read {_short(tok)}: write a repeat as NAME*COUNT, e.g. attention*24")
        else:
            out.append(tok)
        if len(out) > MAX_LAYERS:
            raise PlacementError(f"placement has more than {MAX_LAYERS} layers, expected {space.num_layers}")
    if len(out) != space.num_layers:
        raise PlacementError(f"placement has {len(out)} layers, expected {space.num_layers}")
    return out


def placements_from_data(data: Any, space: SearchSpace, source: str) -> list[Placement]:
    """Placements from parsed JSON/YAML: a list of names, a list of lists, or a mapping with
    ``layers`` (one placement), ``placements`` (a list of them) or ``placement``."""
    if isinstance(data, Mapping):
        keys = [k for k in ("layers", "placement", "placements") if k in data]
        if not keys:
            raise PlacementError(f"{source}: expected a 'layers' or 'placements' key, found {sorted(map(str, data))[:5]}")
        if len(keys) > 1:
            raise PlacementError(f"{source}: has both {keys[0]!r} and {keys[1]!r}; give one")
        key = keys[0]
        value = data[key]
        if key == "placements":
            if not isinstance(value, list) or not value:
                raise PlacementError(f"{source}: 'placements' must be a non-empty list of lists")
            return [_one(item, space, f"{source}: placements[{i}]") for i, item in enumerate(value)]
        return [_one(value, space, f"{source}: {key}")]
    if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
        return [_one(item, space, f"{source}: [{i}]") for i, item in enumerate(data)]
    if isinstance(data, (list, str)):
        return [_one(data, space, source)]
    raise PlacementError(f"{source}: expected a list of mixer names or a mapping, got {type(data).__name__}")


def _one(value: Any, space: SearchSpace, where: str) -> Placement:
    try:
        if isinstance(value, str):
            return Placement.from_string(value, space)
        if not isinstance(value, list):
            raise PlacementError(f"expected a list of mixer names, got {type(value).__name__}")
        if all(isinstance(v, str) for v in value):
            value = _expand_tokens(value, space)
        return Placement(value, space)
    except PlacementError as e:
        raise PlacementError(f"{where}: {e}") from None


def load_placements(path: str | os.PathLike[str], space: SearchSpace) -> list[Placement]:
    """All placements in a JSON or YAML file (``layers:``, ``placements:``, or a bare list)."""
    from placement_search.files import load_structured

    data = load_structured(path)
    return placements_from_data(data, space, source=str(Path(path)))
