"""Known-answer test functions and placement samplers (until the evaluator's dataset exists).

Quality functions (:class:`SyntheticQuality`) are cluster expansions with known coefficients:

* :func:`additive_quality` — per-layer terms only;
* :func:`pairwise_quality` — per-layer terms plus pair terms between layers at distance 1..D.

Both are stored gauge-fixed (see :func:`placement_search.surrogate.cluster.canonicalize`) so their
arrays can be compared directly with a fitted :class:`~placement_search.surrogate.cluster.ClusterExpansion`.

Samplers, tagged by name in the ``sampler`` column of :func:`make_synthetic_table`:

* ``uniform`` — each layer's mixer drawn independently and uniformly;
* ``stratified`` — mixer counts drawn uniformly from the simplex, then the layers shuffled, so
  placements with few or many attention layers are as common as the middle;
* ``structured`` — hand-made families: all-X, periodic patterns, and first/last-k splits.

(The samplers are :mod:`placement_search.sampling`'s, so tests and campaigns draw alike.)

A toy speed (throughput proxy from per-mixer costs) is attached for speed-bucket metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from placement_search import sampling
from placement_search.placement import Placement, SearchSpace
from placement_search.surrogate.cluster import canonicalize, evaluate_expansion
from placement_search.surrogate.features import as_onehot

SUPER_APRIEL_MIXERS = ("attention", "sliding_window", "gdn", "kda")
#: Toy per-layer decode cost of each mixer (attention dearest); speed = layers / total cost.
TOY_COSTS = {"attention": 1.0, "sliding_window": 0.35, "gdn": 0.3, "kda": 0.32}
SAMPLERS = sampling.SAMPLERS


def default_space(num_layers: int = 48) -> SearchSpace:
    """The Super Apriel mixers over ``num_layers`` layers."""
    return SearchSpace.uniform(num_layers, SUPER_APRIEL_MIXERS)


@dataclass
class SyntheticQuality:
    """``f(x) = intercept + sum_l unary[l, x_l] + sum_d sum_l pair[d][l, x_l, x_{l+d}]`` plus Gaussian noise."""

    space: SearchSpace
    unary: np.ndarray
    pair: dict[int, np.ndarray] = field(default_factory=dict)
    intercept: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        self.unary, self.pair, self.intercept = canonicalize(self.unary, self.pair, self.intercept)

    def __call__(self, X: Any) -> np.ndarray:
        """Noiseless quality of placements (or one-hot rows)."""
        oh = as_onehot(X, num_layers=self.space.num_layers, num_mixers=self.space.num_mixers)
        return evaluate_expansion(oh.indices(), self.unary, self.pair, self.intercept)

    def sample(self, X: Any, rng: np.random.Generator) -> np.ndarray:
        """Noisy observations."""
        clean = self(X)
        return clean + self.noise_std * rng.standard_normal(clean.shape[0])


def _unary(space: SearchSpace, rng: np.random.Generator) -> np.ndarray:
    """Per-layer effects: attention helps most, more so in some layers (a smooth random profile)."""
    n, m = space.num_layers, space.num_mixers
    depth = np.linspace(0.0, 1.0, n)
    profile = 0.5 + np.abs(np.sin(2.5 * np.pi * depth + rng.uniform(0, np.pi)))
    base = np.linspace(1.0, -0.5, m)  # first mixer (attention) best on average
    return profile[:, None] * (base[None, :] + 0.6 * rng.standard_normal((n, m)))


def additive_quality(
    space: SearchSpace | None = None, *, seed: int = 0, noise_std: float = 0.1
) -> SyntheticQuality:
    """A purely per-layer quality function."""
    space = space or default_space()
    rng = np.random.default_rng(seed)
    return SyntheticQuality(space, _unary(space, rng), {}, 50.0, noise_std)


def pairwise_quality(
    space: SearchSpace | None = None,
    *,
    seed: int = 0,
    max_distance: int = 3,
    pair_scale: float = 0.8,
    noise_std: float = 0.1,
) -> SyntheticQuality:
    """Per-layer terms plus pair terms for distances ``1..max_distance`` (decaying with distance)."""
    space = space or default_space()
    rng = np.random.default_rng(seed)
    n, m = space.num_layers, space.num_mixers
    pair = {d: (pair_scale / d) * rng.standard_normal((n - d, m, m)) for d in range(1, max_distance + 1) if d < n}
    return SyntheticQuality(space, _unary(space, rng), pair, 50.0, noise_std)


# -- samplers (placement_search.sampling; wrapped here for the known-answer tables) ---------------


def sample_placements(space: SearchSpace, sampler: str, n: int, rng: np.random.Generator) -> list[Placement]:
    """Up to ``n`` distinct placements from the named sampler of :mod:`placement_search.sampling`."""
    return sampling.sample(space, n, sampler, seed=rng)


def sample_uniform(space: SearchSpace, n: int, rng: np.random.Generator) -> list[Placement]:
    """``n`` distinct placements, every layer uniform over the mixers it offers."""
    return sample_placements(space, "uniform", n, rng)


def toy_speed(placements: list[Placement]) -> np.ndarray:
    """Layers per unit of toy cost (higher is faster): all-attention is 1.0."""
    costs = np.array([[TOY_COSTS.get(m, 0.5) for m in p.mixers] for p in placements])
    return costs.shape[1] / costs.sum(axis=1)


def make_synthetic_table(
    quality: SyntheticQuality,
    sizes: dict[str, int],
    *,
    seed: int = 0,
    target: str = "score",
) -> pd.DataFrame:
    """A table like the evaluator's: ``placement`` (letter code), ``target``, ``sampler``, ``speed``,
    ``true_score`` (the noiseless value), with ``sizes[sampler]`` rows per sampler."""
    rng = np.random.default_rng(seed)
    frames = []
    for sampler, count in sizes.items():
        placements = sample_placements(quality.space, sampler, int(count), rng)
        frames.append(
            pd.DataFrame(
                {
                    "placement": [p.code() for p in placements],
                    target: quality.sample(placements, rng),
                    "sampler": sampler,
                    "speed": toy_speed(placements),
                    "true_score": quality(placements),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
