"""Constraints on placements: mixer counts, pinned layers, forbidden mixers, no lone layers.

- ``min_count`` / ``max_count``: layers per mixer (``attention>=4``, ``attention<=12``);
- ``pinned``: a layer's mixer is fixed (``0=attention``);
- ``forbidden``: mixers a layer may not use (``47!=sliding_window``);
- ``no_single``: a mixer may be used on zero layers or on two or more, never on exactly one (the Super
  Apriel paper excluded such placements: a lone layer of a mixer pays its kernels' fixed costs and
  its cache machinery for one layer).

Pinned and forbidden layers shrink the search space itself (:meth:`Constraints.restrict`); counts and
lone layers are checked per placement (:meth:`Constraints.violations`, in Optuna's convention: a
value <= 0 means satisfied, so a search can rank infeasible trials by how far off they are).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement, SearchSpace

_COUNT_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==)\s*(\d+)\s*$")
_LAYER_RE = re.compile(r"^\s*(\d+)\s*(=|!=)\s*([A-Za-z_][\w.\-]*)\s*$")


class ConstraintError(PlacementSearchError):
    """A constraint that cannot be read, or that no placement can satisfy."""


@dataclass(frozen=True)
class Constraints:
    """What a placement must satisfy besides fitting the search space."""

    min_count: Mapping[str, int] = field(default_factory=dict)
    max_count: Mapping[str, int] = field(default_factory=dict)
    pinned: Mapping[int, str] = field(default_factory=dict)
    forbidden: Mapping[int, frozenset[str]] = field(default_factory=dict)
    no_single: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, items: Iterable[str], space: SearchSpace, no_single: Iterable[str] = ()) -> Constraints:
        """Read ``NAME>=K``, ``NAME<=K``, ``NAME==K``, ``LAYER=NAME`` (pin) and ``LAYER!=NAME`` (forbid).

        Names accept the placement aliases and letters (``A>=4``, ``swa<=8``).
        """
        min_count: dict[str, int] = {}
        max_count: dict[str, int] = {}
        pinned: dict[int, str] = {}
        forbidden: dict[int, set[str]] = {}
        for item in items:
            m = _COUNT_RE.match(item)
            if m:
                name = _resolve(space, m.group(1), item)
                k = int(m.group(3))
                if m.group(2) in (">=", "=="):
                    min_count[name] = max(min_count.get(name, 0), k)
                if m.group(2) in ("<=", "=="):
                    max_count[name] = min(max_count.get(name, k), k)
                continue
            m = _LAYER_RE.match(item)
            if m:
                layer = int(m.group(1))
                if layer >= space.num_layers:
                    raise ConstraintError(
                        f"constraint {item!r}: layer {layer} is beyond the last ({space.num_layers - 1})"
                    )
                name = _resolve(space, m.group(3), item)
                if m.group(2) == "=":
                    if layer in pinned and pinned[layer] != name:
                        raise ConstraintError(
                            f"constraint {item!r}: layer {layer} is already pinned to {pinned[layer]!r}"
                        )
                    pinned[layer] = name
                else:
                    forbidden.setdefault(layer, set()).add(name)
                continue
            raise ConstraintError(
                f"cannot read constraint {item!r}: use NAME>=K, NAME<=K, NAME==K, LAYER=NAME or LAYER!=NAME"
            )
        lone = frozenset(_resolve(space, n, n) for n in no_single)
        out = cls(min_count, max_count, pinned, {k: frozenset(v) for k, v in forbidden.items()}, lone)
        out.restrict(space)  # raises when pins and forbids leave a layer empty
        out.check_feasible(space)
        return out

    def __bool__(self) -> bool:
        return bool(self.min_count or self.max_count or self.pinned or self.forbidden or self.no_single)

    def restrict(self, space: SearchSpace) -> SearchSpace:
        """``space`` with pinned layers reduced to their mixer and forbidden mixers removed."""
        if not self.pinned and not self.forbidden:
            return space
        allowed = []
        for i in range(space.num_layers):
            names = set(space.allowed_at(i))
            if i in self.pinned:
                if self.pinned[i] not in names:
                    raise ConstraintError(f"layer {i}: pinned mixer {self.pinned[i]!r} is not offered there")
                names = {self.pinned[i]}
            names -= self.forbidden.get(i, frozenset())
            if not names:
                raise ConstraintError(f"layer {i}: every mixer it offers is forbidden or excluded by a pin")
            allowed.append(frozenset(names))
        return SearchSpace(space.num_layers, space.mixers, tuple(allowed), dict(space.letters))

    def check_feasible(self, space: SearchSpace) -> None:
        """Raise when the count bounds cannot be met in the restricted space (a necessary check)."""
        restricted = self.restrict(space)
        n = space.num_layers
        for name in space.mixers:
            lo, hi = self.min_count.get(name, 0), self.max_count.get(name, n)
            can = sum(name in restricted.allowed_at(i) for i in range(n))
            must = sum(restricted.allowed_at(i) == (name,) for i in range(n))
            if lo > hi:
                raise ConstraintError(f"{name}: at least {lo} and at most {hi} layers cannot both hold")
            if lo > can:
                raise ConstraintError(f"{name}: at least {lo} layers asked, but only {can} layers may use it")
            if must > hi:
                raise ConstraintError(
                    f"{name}: at most {hi} layers asked, but {must} layers are pinned to it"
                )
        if sum(self.min_count.values()) > n:
            raise ConstraintError(
                f"the minimum counts add up to {sum(self.min_count.values())} layers, more than {n}"
            )

    def violations(self, placement: Placement) -> dict[str, float]:
        """Per constraint, how far ``placement`` is off (<= 0: satisfied). Pins and forbids count per layer."""
        counts = placement.counts()
        out: dict[str, float] = {}
        for name, lo in self.min_count.items():
            out[f"{name}>={lo}"] = float(lo - counts.get(name, 0))
        for name, hi in self.max_count.items():
            out[f"{name}<={hi}"] = float(counts.get(name, 0) - hi)
        for name in sorted(self.no_single):
            out[f"no-single-{name}"] = 1.0 if counts.get(name, 0) == 1 else 0.0
        if self.pinned:
            out["pinned"] = float(sum(placement[i] != name for i, name in self.pinned.items()))
        if self.forbidden:
            out["forbidden"] = float(sum(placement[i] in names for i, names in self.forbidden.items()))
        return out

    def satisfied(self, placement: Placement) -> bool:
        return all(v <= 0 for v in self.violations(placement).values())

    def describe(self) -> list[str]:
        """The constraints as the strings :meth:`parse` reads (plus ``no-single=...``)."""
        out = [f"{k}>={v}" for k, v in self.min_count.items()] + [
            f"{k}<={v}" for k, v in self.max_count.items()
        ]
        out += [f"{i}={m}" for i, m in sorted(self.pinned.items())]
        out += [f"{i}!={m}" for i, ms in sorted(self.forbidden.items()) for m in sorted(ms)]
        if self.no_single:
            out.append("no-single=" + ",".join(sorted(self.no_single)))
        return out


def _resolve(space: SearchSpace, token: str, item: str) -> str:
    """Canonical mixer name of ``token`` (aliases and letters accepted), whichever layers offer it."""
    unrestricted = SearchSpace.uniform(space.num_layers, space.mixers, space.letters)
    try:
        return unrestricted.resolve(token, 0)
    except PlacementSearchError:
        raise ConstraintError(
            f"constraint {item!r}: unknown mixer {token!r}; valid: {', '.join(space.mixers)}"
        ) from None
