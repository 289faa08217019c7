"""Placement samplers: which placements an evaluation campaign measures.

- :func:`sample_uniform`: each layer's mixer drawn independently and uniformly from the mixers
  the layer offers. Mixer counts concentrate around N/M, so extreme mixes are rare.
- :func:`sample_stratified`: a composition (layers per mixer) drawn uniformly from all
  compositions of N into M parts, then layers assigned at random; extreme mixes (2 attention
  layers, 40 attention layers, ...) are as common as balanced ones.
- :func:`structured_family`: hand-made families — all-X; periodic patterns (one mixer every k-th
  layer, the rest another); first/last k layers of one mixer.

:func:`sample` draws from a named sampler and deduplicates (against ``exclude`` as well), so a
campaign never measures the same placement twice. Every sampler takes a seed and is reproducible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from itertools import permutations

import numpy as np

from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement, SearchSpace

SAMPLERS = ("uniform", "stratified", "structured")


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def sample_uniform(space: SearchSpace, rng: np.random.Generator) -> Placement:
    """One placement with every layer's mixer drawn uniformly from the mixers it offers."""
    return Placement([rng.choice(space.allowed_at(i)) for i in range(space.num_layers)], space)


def random_composition(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """Counts ``[m]`` summing to ``n``, uniform over all compositions (stars and bars)."""
    bars = np.sort(rng.choice(n + m - 1, size=m - 1, replace=False))
    edges = np.concatenate([[-1], bars, [n + m - 1]])
    return np.diff(edges) - 1


def sample_stratified(space: SearchSpace, rng: np.random.Generator, max_tries: int = 100) -> Placement:
    """One placement whose mixer counts are uniform over compositions, layers assigned at random.

    In a space where some layers offer fewer mixers, the counts are drawn the same way and the
    layers are matched greedily (most constrained first); a draw that cannot be matched is redrawn.
    """
    n, mixers = space.num_layers, space.mixers
    for _ in range(max_tries):
        counts = random_composition(n, len(mixers), rng)
        if space.allowed is None:
            names = np.repeat(np.array(mixers, dtype=object), counts)
            rng.shuffle(names)
            return Placement(list(names), space)
        remaining = dict(zip(mixers, counts.tolist(), strict=True))
        order = sorted(range(n), key=lambda i: (len(space.allowed_at(i)), rng.random()))
        chosen: dict[int, str] = {}
        for i in order:
            options = [m for m in space.allowed_at(i) if remaining[m] > 0]
            if not options:
                break
            weights = np.array([remaining[m] for m in options], dtype=float)
            pick = options[rng.choice(len(options), p=weights / weights.sum())]
            chosen[i] = pick
            remaining[pick] -= 1
        else:
            return Placement([chosen[i] for i in range(n)], space)
    return sample_uniform(space, rng)


def structured_family(space: SearchSpace, periods: Iterable[int] = (2, 3, 4, 6, 8, 12)) -> list[Placement]:
    """All-X, periodic (X every k-th layer, Y elsewhere) and first/last-k placements, deduplicated.

    Only placements that fit the space are kept (layers that don't offer a mixer drop that member).
    """
    n = space.num_layers
    out: dict[Placement, None] = {}

    def add(names: list[str]) -> None:
        with contextlib.suppress(PlacementSearchError):
            out.setdefault(Placement(names, space), None)

    for x in space.mixers:
        add([x] * n)
    for x, y in permutations(space.mixers, 2):
        for k in periods:
            if k < n:
                add([x if i % k == 0 else y for i in range(n)])
        for k in sorted({1, 2, n // 8, n // 4, n // 2, 3 * n // 4} - {0}):
            if k < n:
                add([x] * k + [y] * (n - k))
                add([y] * (n - k) + [x] * k)
    return list(out)


def sample(
    space: SearchSpace,
    count: int,
    sampler: str = "uniform",
    *,
    seed: int | np.random.Generator | None = 0,
    exclude: Iterable[Placement] = (),
    max_tries_factor: int = 50,
) -> list[Placement]:
    """``count`` distinct placements from ``sampler`` (``uniform``, ``stratified``, ``structured``).

    ``structured`` returns the family in a seeded random order (at most ``count`` of them). Fewer than
    ``count`` placements come back only when the space or family has fewer new ones.
    """
    if count < 0:
        raise PlacementSearchError(f"sample count must be >= 0, got {count}")
    rng = _rng(seed)
    seen = set(exclude)
    if sampler == "structured":
        family = [p for p in structured_family(space) if p not in seen]
        order = rng.permutation(len(family))
        return [family[i] for i in order[:count]]
    draw: Callable[[SearchSpace, np.random.Generator], Placement]
    if sampler == "uniform":
        draw = sample_uniform
    elif sampler == "stratified":
        draw = sample_stratified
    else:
        raise PlacementSearchError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    out: list[Placement] = []
    tries = 0
    limit = max(count * max_tries_factor, 100)
    while len(out) < count and tries < limit:
        p = draw(space, rng)
        tries += 1
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out
