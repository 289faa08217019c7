"""Exact Pareto front of a cluster-expansion quality model under an additive cost.

Quality (a cluster expansion with pair terms up to distance ``D``; ``D = 0`` is the linear
per-layer model)::

    Q(x) = intercept + sum_l unary[l, x_l] + sum_{d=1..D} sum_l pair[d][l, x_l, x_{l+d}]

Cost (additive, e.g. decode step time at a fixed batch)::

    C(x) = sum_l cost[l, x_l]

Dynamic programming over layers: the state after layer ``l`` is the last ``D`` mixers
(``M**D`` states) and the accumulated cost, discretised into ``bins`` steps of width ``delta``;
each (state, cost bin) keeps the best quality reaching it, with its exact (undiscretised) cost
and a back-pointer. The front is the non-dominated set of the final (exact cost, quality) pairs.

Exactness: when every per-layer cost is a multiple of ``delta`` (integer costs, say), the front is
exact. Otherwise a placement can be lost to another in the same cost bin whose exact cost is at
most ``N * delta / 2`` larger; with the default ``bins=20000`` that is < 0.15% of the cost range
for N=48. The returned costs and qualities are always the exact values of the returned placements.

Time ``O(N * M**(D+1) * bins)``; memory ``O(N * M**D * bins)`` bytes of back-pointers
(48 layers, 4 mixers, D=3, 20000 bins: ~61 MB, ~2 s on one core).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from placement_search.errors import PlacementSearchError
from placement_search.pareto import pareto_mask
from placement_search.placement import Placement, SearchSpace


@dataclass(frozen=True)
class ExactFront:
    """The Pareto-optimal placements, ordered by increasing cost (and quality)."""

    placements: list[Placement]
    quality: np.ndarray
    cost: np.ndarray
    delta: float

    def __len__(self) -> int:
        return len(self.placements)


def evaluate(
    indices: np.ndarray, unary: np.ndarray, pair: Mapping[int, np.ndarray], intercept: float, cost: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Quality and cost of placements given as mixer indices ``[P, N]``."""
    idx = np.atleast_2d(indices)
    n = unary.shape[0]
    layers = np.arange(n)
    q = np.full(idx.shape[0], float(intercept)) + unary[layers, idx].sum(axis=1)
    for d, mats in pair.items():
        if d < n:
            q += mats[layers[: n - d], idx[:, : n - d], idx[:, d:]].sum(axis=1)
    c = cost[layers, idx].sum(axis=1)
    return q, c


def exact_front(
    space: SearchSpace,
    unary: np.ndarray,
    cost: np.ndarray,
    pair: Mapping[int, np.ndarray] | None = None,
    intercept: float = 0.0,
    *,
    bins: int = 20000,
) -> ExactFront:
    """The (quality max, cost min) Pareto front over every placement of ``space``.

    Parameters
    ----------
    unary: ``[N, M]`` per-layer quality terms (columns in ``space.mixers`` order).
    cost: ``[N, M]`` per-layer additive cost (>= 0 not required).
    pair: ``{d: [N-d, M, M]}`` pair terms for layers ``l`` and ``l+d``.
    bins: cost resolution (see the module docstring on exactness).
    """
    n, m = space.num_layers, space.num_mixers
    pair = {int(d): np.asarray(v, dtype=np.float64) for d, v in (pair or {}).items() if np.any(v)}
    unary = np.asarray(unary, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if unary.shape != (n, m) or cost.shape != (n, m):
        raise PlacementSearchError(f"unary and cost must be [{n}, {m}], got {unary.shape} and {cost.shape}")
    for d, mats in pair.items():
        if d < 1 or mats.shape != (n - d, m, m):
            raise PlacementSearchError(f"pair[{d}] must be [{n - d}, {m}, {m}], got {mats.shape}")
    if not (np.isfinite(unary).all() and np.isfinite(cost).all()):
        raise PlacementSearchError("unary and cost must be finite")
    if bins < 2:
        raise PlacementSearchError(f"bins must be >= 2, got {bins}")

    allowed = _allowed(space)
    # Cost discretisation relative to each layer's cheapest allowed mixer.
    low = np.where(allowed, cost, np.inf).min(axis=1)
    high = np.where(allowed, cost, -np.inf).max(axis=1)
    span = float((high - low).sum())
    delta = span / (bins - 1) if span > 0 else 1.0
    cbin = np.where(allowed, np.rint((cost - low[:, None]) / delta), 0).astype(np.int64)
    nbins = int(cbin.max(axis=1).sum()) + 1
    best, exact, back, depth, start = _dp(allowed, unary, pair, intercept, cbin, nbins, cost)

    states, kbins = np.nonzero(np.isfinite(best))
    if states.size == 0:
        raise PlacementSearchError("no placement fits the search space")
    obj = np.stack([best[states, kbins], -exact[states, kbins]], axis=1)
    front = np.flatnonzero(pareto_mask(obj))
    placements = [_backtrack(int(states[i]), int(kbins[i]), back, cbin, depth, m, n, start, None) for i in front]
    idx = np.array(placements)
    q, c = evaluate(idx, unary, pair, intercept, cost)
    order = np.argsort(c, kind="stable")
    return ExactFront(
        placements=[Placement([space.mixers[j] for j in idx[i]], space) for i in order],
        quality=q[order],
        cost=c[order],
        delta=delta,
    )


def _allowed(space: SearchSpace) -> np.ndarray:
    """``[N, M]`` bool: which mixer each layer may use."""
    allowed = np.zeros((space.num_layers, space.num_mixers), dtype=bool)
    for i in range(space.num_layers):
        allowed[i, [space.index(x) for x in space.allowed_at(i)]] = True
    return allowed


def _dp(
    allowed: np.ndarray,
    unary: np.ndarray,
    pair: Mapping[int, np.ndarray],
    intercept: float,
    shift: np.ndarray,
    nbins: int,
    extra: np.ndarray,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], int, int]:
    """The dynamic program shared by both fronts.

    State after layer ``l``: the last ``depth`` mixers and a resource index in ``0..nbins-1`` to which
    mixer ``b`` at layer ``l`` adds ``shift[l, b]`` (a cost bin, or a count stride). Each (state, index)
    keeps the best quality, the additive ``extra`` [N, M] of that path, and a back-pointer (the dropped
    oldest mixer; only the ``keep`` columns are stored when given). Returns ``best [S, K]``,
    ``extra_sum [S, K]``, the back-pointers per layer from ``start``, ``depth`` and ``start``.
    """
    n, m = allowed.shape
    depth = min(max(pair, default=0), n - 1)

    d_states = m**depth if depth > 0 else 1
    neg = -np.inf
    # best[s, k]: best quality with state s (last `depth` mixers, base-m digits, oldest first) at cost bin k
    best = np.full((d_states, nbins), neg)
    exact = np.zeros((d_states, nbins))
    back: list[np.ndarray] = []  # per layer >= depth: the dropped (oldest) mixer of the best predecessor

    # Layers 0 .. depth-1: enumerate their M**depth prefixes directly.
    if depth > 0:
        prefixes = np.array(np.unravel_index(np.arange(d_states), (m,) * depth)).T  # [S, depth]
        ok = allowed[np.arange(depth), prefixes].all(axis=1)
        sub_pair = {d: mats[: depth - d] for d, mats in pair.items() if d < depth}
        q0, _ = evaluate(prefixes, unary[:depth], sub_pair, intercept, extra[:depth])
        c0 = extra[np.arange(depth), prefixes].sum(axis=1)
        k0 = shift[np.arange(depth), prefixes].sum(axis=1)
        for s in np.flatnonzero(ok):
            best[s, k0[s]] = q0[s]
            exact[s, k0[s]] = c0[s]
        start = depth
    else:
        best[0, 0] = intercept
        start = 0

    for layer in range(start, n):
        new_best = np.full_like(best, neg)
        new_exact = np.zeros_like(exact)
        dropped = np.zeros((d_states, nbins), dtype=np.int8)
        if depth > 0:
            # old state s = (a_{l-depth}, ..., a_{l-1}); digits oldest first
            digits = np.array(np.unravel_index(np.arange(d_states), (m,) * depth)).T  # [S, depth]
        for b in range(m):
            if not allowed[layer, b]:
                continue
            gain = np.full(d_states, unary[layer, b])
            for d, mats in pair.items():
                if d <= layer:
                    gain += mats[layer - d, digits[:, depth - d], b]
            step = int(shift[layer, b])
            cand = best + gain[:, None]  # [S, K]
            cand_exact = exact + extra[layer, b]
            if depth > 0:
                cand = cand.reshape(m, d_states // m, nbins)  # [dropped, mid, K]
                cand_exact = cand_exact.reshape(m, d_states // m, nbins)
                arg = cand.argmax(axis=0)  # [mid, K]
                top = np.take_along_axis(cand, arg[None], axis=0)[0]
                top_exact = np.take_along_axis(cand_exact, arg[None], axis=0)[0]
                targets = np.arange(d_states // m) * m + b  # new state = (mid..., b)
            else:
                arg = np.zeros((1, nbins), dtype=np.int64)
                top, top_exact, targets = cand, cand_exact, np.array([0])
            if step:
                top = np.concatenate([np.full((top.shape[0], step), neg), top[:, :-step]], axis=1)
                top_exact = np.concatenate([np.zeros((top.shape[0], step)), top_exact[:, :-step]], axis=1)
                arg = np.concatenate([np.zeros((arg.shape[0], step), dtype=arg.dtype), arg[:, :-step]], axis=1)
            if depth > 0:
                new_best[targets] = top
                new_exact[targets] = top_exact
                dropped[targets] = arg
            else:
                better = top[0] > new_best[0]
                new_best[0] = np.where(better, top[0], new_best[0])
                new_exact[0] = np.where(better, top_exact[0], new_exact[0])
                dropped[0] = np.where(better, b, dropped[0])
        best, exact = new_best, new_exact
        back.append(dropped if keep is None else dropped[:, keep])
    return best, exact, back, depth, start



def _backtrack(state: int, k: int, back: list[np.ndarray], shift: np.ndarray, depth: int, m: int, n: int,
               start: int, inverse: np.ndarray | None) -> list[int]:
    """Mixer indices of the path ending in ``state`` at resource index ``k`` after the last layer.

    ``inverse`` maps a resource index to its stored column when the back-pointers were compressed.
    """
    out = [0] * n
    for layer in range(n - 1, start - 1, -1):
        dropped = int(back[layer - start][state, k if inverse is None else inverse[k]])
        if depth > 0:
            b = state % m
            state = dropped * m ** (depth - 1) + state // m
        else:
            b = dropped
        out[layer] = b
        k -= int(shift[layer, b])
    if depth > 0:
        digits = np.unravel_index(state, (m,) * depth)
        for j in range(depth):
            out[j] = int(digits[j])
    return out


@dataclass(frozen=True)
class CountsFront:
    """The Pareto-optimal placements when speed depends on mixer counts only, by increasing speed."""

    placements: list[Placement]
    quality: np.ndarray
    speed: np.ndarray

    def __len__(self) -> int:
        return len(self.placements)


def exact_front_by_counts(
    space: SearchSpace,
    unary: np.ndarray,
    speed: Callable[[dict[str, int]], float],
    pair: Mapping[int, np.ndarray] | None = None,
    intercept: float = 0.0,
    *,
    max_cells: int = 2_000_000,
) -> CountsFront:
    """The exact (quality max, speed max) front when speed is any function of the mixer counts.

    This covers every batch policy of a cost table whose per-layer costs do not depend on the layer's
    position (the shipped tables): under ``max_fit`` the batch, and so the throughput, is a nonlinear
    function of the counts, which no additive cost captures. The dynamic program keeps, for every count
    vector, the best quality reaching it (state: last ``D`` mixers and the counts of all mixers but the
    last); ``speed`` is then called once per reachable count vector (``nan`` = infeasible, e.g. does not
    fit the memory budget) and the front taken over those. Exact, no discretisation.

    ``max_cells`` bounds ``M**D * (N+1)**(M-1)`` (48 layers, 4 mixers, D=3: 7.5M; use D <= 2 or raise it).
    """
    n, m = space.num_layers, space.num_mixers
    pair = {int(d): np.asarray(v, dtype=np.float64) for d, v in (pair or {}).items() if np.any(v)}
    unary = np.asarray(unary, dtype=np.float64)
    if unary.shape != (n, m):
        raise PlacementSearchError(f"unary must be [{n}, {m}], got {unary.shape}")
    for d, mats in pair.items():
        if d < 1 or mats.shape != (n - d, m, m):
            raise PlacementSearchError(f"pair[{d}] must be [{n - d}, {m}, {m}], got {mats.shape}")
    depth = min(max(pair, default=0), n - 1)
    radix = n + 1
    nbins = radix ** (m - 1)
    if m ** depth * nbins > max_cells:
        raise PlacementSearchError(
            f"{m ** depth * nbins} DP cells (M**D * (N+1)**(M-1)) exceed max_cells={max_cells}"
        )
    strides = np.array([radix**j for j in range(m - 1)] + [0], dtype=np.int64)
    shift = np.tile(strides, (n, 1))
    counts = np.array(np.unravel_index(np.arange(nbins), (radix,) * (m - 1), order="F")).T  # [K, M-1]
    keep = np.flatnonzero(counts.sum(axis=1) <= n)
    inverse = np.full(nbins, -1, dtype=np.int64)
    inverse[keep] = np.arange(keep.size)
    best, _, back, depth, start = _dp(
        _allowed(space), unary, pair, intercept, shift, nbins, np.zeros((n, m)), keep=keep
    )
    cell_best = best.max(axis=0)
    cell_state = best.argmax(axis=0)
    cells = np.flatnonzero(np.isfinite(cell_best))
    if cells.size == 0:
        raise PlacementSearchError("no placement fits the search space")
    speeds = np.array([
        speed({**dict(zip(space.mixers[:-1], map(int, counts[k]), strict=True)),
               space.mixers[-1]: n - int(counts[k].sum())})
        for k in cells
    ], dtype=float)
    ok = ~np.isnan(speeds)
    cells, speeds = cells[ok], speeds[ok]
    front = np.flatnonzero(pareto_mask(np.stack([cell_best[cells], speeds], axis=1)))
    idx = np.array([
        _backtrack(int(cell_state[cells[i]]), int(cells[i]), back, shift, depth, m, n, start, inverse) for i in front
    ])
    q, _ = evaluate(idx, unary, pair, intercept, np.zeros((n, m)))
    order = np.argsort(speeds[front], kind="stable")
    return CountsFront(
        placements=[Placement([space.mixers[j] for j in idx[i]], space) for i in order],
        quality=q[order],
        speed=speeds[front][order],
    )
