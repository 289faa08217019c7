"""Multi-objective placement search: maximise predicted quality and decode throughput with Optuna.

One categorical parameter per layer (``layer_00`` ... ``layer_47``, choices = the mixers the layer may use
after pins and forbids); two objectives, both maximised: the surrogate's predicted quality and the cost
model's throughput (tokens/s) at one condition (context length, batch policy, memory budget, GPU table).
Count and lone-layer constraints go through ``trial.set_constraint`` (Optuna's NSGA-II ranks feasible
trials first and infeasible ones by total violation; the front keeps feasible trials only).

The sampler is chosen explicitly (Optuna 5 defaults to TPE for several objectives): ``nsga2`` (default),
``tpe``, ``gp`` (needs torch) or ``random``. Trials are asked and told in generations, so the surrogate and
the cost model score a whole generation in one call. The study lives in any Optuna storage (in memory by
default; a SQLite/PostgreSQL URL or a journal file makes it resumable and watchable with optuna-dashboard).

Convergence and cost (measured on the 48-layer Super Apriel space, see ``benchmarks/search_vs_exact.py``):

* **Per-trial cost.** Optuna's NSGA-II and TPE infer their search space from every finished trial on every
  ask (a deep copy of the whole history: cost grows with the study). The search space here is known, so the
  samplers get it fixed (:class:`FixedSpaceNSGAII`, :class:`FixedSpaceTPE`); the front is read with
  ``get_trials(deepcopy=False)`` instead of ``best_trials``.
* **Seeds.** Known placements are enqueued first: all-X, the structured family of
  :func:`placement_search.sampling.structured_family` (periodic and first/last-k patterns), and any
  ``seeds`` given (a previous front).
* **Local-search polish.** After the evolutionary phase, :func:`polish_front` runs a Pareto local search from
  the front: every single-layer change, every swap of two layers' mixers (same mixer counts, so the same
  speed under a count-dependent cost) and every change of two adjacent layers of each front member is
  scored in batch with the same surrogate and cost model; non-dominated improvements join the archive and
  are searched from in turn. The final archive's new placements are enqueued and told as trials, inside
  the trial budget, so the study remains the record of every placement on the front.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from placement_search.constraints import Constraints
from placement_search.errors import PlacementSearchError
from placement_search.pareto import hypervolume, pareto_mask
from placement_search.placement import Placement, SearchSpace

SAMPLERS = ("nsga2", "tpe", "gp", "random")

#: Quality of placements: ``(mean [P], std [P] or None)``. A quality function may also offer
#: ``on_indices(idx [P, N] int) -> mean [P]`` for fast batch scoring (the polish uses it when present).
QualityFn = Callable[[Sequence[Placement]], tuple[np.ndarray, np.ndarray | None]]
#: Decode throughput of placements in tokens/s, ``nan`` where a placement does not fit the memory budget.
#: May also offer ``on_indices(idx [P, N] int) -> tokens/s [P]``.
SpeedFn = Callable[[Sequence[Placement]], np.ndarray]
#: Quality or speed of placements given as mixer indices ``[P, N]``.
ArrayFn = Callable[[np.ndarray], np.ndarray]

#: Rows scored per call in the polish (bounds the one-hot matrices handed to a surrogate).
CHUNK_ROWS = 65536
_CONSTRAINT_PREFIX = "constraints:"  # Optuna's system-attribute key prefix of ``trial.set_constraint``


def param_name(layer: int, num_layers: int) -> str:
    """The Optuna parameter name of ``layer`` (zero-padded so names sort by layer)."""
    return f"layer_{layer:0{len(str(num_layers - 1))}d}"


# -- quality and speed on index arrays -------------------------------------------------------------


def placements_from_indices(idx: np.ndarray, space: SearchSpace) -> list[Placement]:
    """Placements of the mixer-index rows ``idx [P, N]``."""
    names = space.mixers
    return [Placement([names[j] for j in row], space) for row in np.asarray(idx)]


def onehot_from_indices(idx: np.ndarray, num_mixers: int) -> np.ndarray:
    """The flattened layer-major one-hot matrix ``[P, N*M]`` (float32) of mixer-index rows."""
    idx = np.asarray(idx, dtype=np.int64)
    p, n = idx.shape
    out = np.zeros((p, n * num_mixers), dtype=np.float32)
    out[np.arange(p)[:, None], np.arange(n)[None, :] * num_mixers + idx] = 1.0
    return out


class SurrogateQuality:
    """A :data:`QualityFn` from a fitted surrogate, with a fast ``on_indices`` for batch scoring.

    ``predict(X, return_std=True)`` is used when the surrogate offers it (ensembles, linear and cluster
    models). ``on_indices`` evaluates a cluster expansion's formula directly (``model.expansion()``), or
    feeds one-hot rows to ``predict`` in chunks of :data:`CHUNK_ROWS`.
    """

    def __init__(self, model: Any, num_mixers: int) -> None:
        self.model, self.num_mixers = model, num_mixers
        self._expansion = None
        if hasattr(model, "expansion"):
            try:
                self._expansion = model.expansion()
            except (AttributeError, PlacementSearchError):
                self._expansion = None

    def __call__(self, placements: Sequence[Placement]) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            mean, std = self.model.predict(list(placements), return_std=True)
            return np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        except TypeError:  # no return_std
            return np.asarray(self.model.predict(list(placements)), dtype=float), None

    def on_indices(self, idx: np.ndarray) -> np.ndarray:
        """Predicted mean quality of mixer-index rows ``[P, N]``."""
        if self._expansion is not None:
            from placement_search.surrogate.cluster import evaluate_expansion

            unary, pair, intercept = self._expansion
            return evaluate_expansion(np.asarray(idx, dtype=np.int64), unary, pair, intercept)
        out = [
            np.asarray(self.model.predict(onehot_from_indices(idx[i : i + CHUNK_ROWS], self.num_mixers)), dtype=float)
            for i in range(0, len(idx), CHUNK_ROWS)
        ]
        return np.concatenate(out) if out else np.zeros(0)


def surrogate_quality(model: Any, num_mixers: int | None = None) -> SurrogateQuality:
    """A :data:`QualityFn` from a fitted surrogate (``num_mixers`` defaults to the surrogate's own)."""
    m = num_mixers if num_mixers is not None else int(getattr(model, "num_mixers_", 0) or 0)
    return SurrogateQuality(model, m)


class ExpansionQuality:
    """A :data:`QualityFn` of a known cluster expansion (``unary [N, M]``, ``pair {d: [N-d, M, M]}``).

    For known-answer problems (the synthetic qualities of :mod:`placement_search.surrogate.datasets`) and for
    checking the search against :func:`placement_search.exact_front.exact_front`. No uncertainty.
    """

    def __init__(self, unary: np.ndarray, pair: dict[int, np.ndarray] | None = None, intercept: float = 0.0) -> None:
        self.unary = np.asarray(unary, dtype=float)
        self.pair = {int(d): np.asarray(v, dtype=float) for d, v in (pair or {}).items()}
        self.intercept = float(intercept)

    def on_indices(self, idx: np.ndarray) -> np.ndarray:
        """Quality of mixer-index rows ``[P, N]``."""
        from placement_search.surrogate.cluster import evaluate_expansion

        return evaluate_expansion(np.asarray(idx, dtype=np.int64), self.unary, self.pair, self.intercept)

    def __call__(self, placements: Sequence[Placement]) -> tuple[np.ndarray, np.ndarray | None]:
        idx = np.stack([p.indices() for p in placements]) if len(placements) else np.zeros((0, len(self.unary)), int)
        return self.on_indices(idx), None


def array_quality(quality: QualityFn, space: SearchSpace) -> ArrayFn:
    """``quality``'s mean on index rows: its ``on_indices`` when offered, else through placements."""
    fast = getattr(quality, "on_indices", None)
    if fast is not None:
        return fast
    return lambda idx: np.asarray(quality(placements_from_indices(idx, space))[0], dtype=float)


def array_speed(speed: SpeedFn, space: SearchSpace) -> ArrayFn:
    """``speed`` on index rows: its ``on_indices`` when offered, else through placements."""
    fast = getattr(speed, "on_indices", None)
    if fast is not None:
        return fast
    return lambda idx: np.asarray(speed(placements_from_indices(idx, space)), dtype=float)


def index_counts(idx: np.ndarray, num_mixers: int) -> np.ndarray:
    """Layers per mixer of each index row, ``[P, M]``."""
    idx = np.asarray(idx)
    return np.stack([(idx == j).sum(axis=1) for j in range(num_mixers)], axis=1)


class TableSpeed:
    """Throughput from a cost table at one condition, cached per mixer counts.

    The shipped tables cost each mixer the same at every layer, so a placement's throughput (and under
    ``max_fit`` its batch) depends only on its mixer counts: one table lookup per count vector.
    """

    def __init__(
        self,
        table: Any,
        spec: Any,
        context: int,
        policy: Any,
        memory_gib: float | None = None,
        variant: str = "table",
    ) -> None:
        from placement_search.evaluators.cost_model import CostModelError

        self._error = CostModelError
        self.table, self.spec, self.context, self.policy = table, spec, context, policy
        self.memory_gib, self.variant = memory_gib, variant
        self._cache: dict[tuple[int, ...], Any] = {}
        main = Placement([layer.main_mixer for layer in spec.layers], spec.search_space)
        self.baseline = self.prediction(main)
        if self.baseline is None:
            raise PlacementSearchError(
                f"the all-{main[0]} placement does not fit the memory budget at context {context}: no speed-up reference"
            )

    def prediction(self, placement: Placement) -> Any:
        """The cost model's prediction (batch, step time, conditions) for ``placement``, or ``None`` if it doesn't fit."""
        key = tuple(placement.counts().values())
        if key not in self._cache:
            try:
                self._cache[key] = self.table.predict(
                    placement,
                    self.context,
                    self.policy,
                    self.memory_gib,
                    variant=self.variant,
                    spec=self.spec,
                    speedup=False,
                )
            except self._error:
                self._cache[key] = None
        return self._cache[key]

    def __call__(self, placements: Sequence[Placement]) -> np.ndarray:
        out = np.full(len(placements), np.nan)
        for i, p in enumerate(placements):
            pred = self.prediction(p)
            if pred is not None:
                out[i] = pred.tokens_per_s
        return out

    def on_indices(self, idx: np.ndarray) -> np.ndarray:
        """Tokens/s of mixer-index rows ``[P, N]`` (``nan``: does not fit); one lookup per new count vector."""
        idx = np.asarray(idx)
        if idx.shape[0] == 0:
            return np.zeros(0)
        space = self.spec.search_space
        counts = index_counts(idx, space.num_mixers)
        # one integer per count vector (base N + 1): a 1-D unique is much faster than np.unique(axis=0)
        code = counts.astype(np.int64) @ (space.num_layers + 1) ** np.arange(space.num_mixers, dtype=np.int64)
        _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
        values = np.full(len(first), np.nan)
        for k, row in enumerate(first):
            t = tuple(int(c) for c in counts[row])
            if t not in self._cache:
                self.prediction(Placement([space.mixers[j] for j in idx[row]], space))
            pred = self._cache[t]
            if pred is not None:
                values[k] = pred.tokens_per_s
        return values[np.asarray(inverse).reshape(-1)]

    def speedup(self, tokens_per_s: np.ndarray) -> np.ndarray:
        """Speed-up over the all-main-mixer (all-attention) placement at the same condition."""
        return np.asarray(tokens_per_s, dtype=float) / self.baseline.tokens_per_s


# -- samplers ---------------------------------------------------------------------------------------


class _FixedSpaceMixin:
    """Hand the sampler the (known) search space instead of inferring it from every trial on every ask.

    Optuna's ``IntersectionSearchSpace`` deep-copies the whole study history per ask; with thousands of
    trials that dominated the per-trial cost. Single-valued (pinned) parameters are left out, as Optuna does.
    """

    fixed_space: dict[str, Any] | None = None

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        if self.fixed_space is None:
            return super().infer_relative_search_space(study, trial)  # type: ignore[misc]
        return dict(self.fixed_space)


def _fixed_space_classes() -> tuple[type, type]:
    import optuna

    class FixedSpaceNSGAII(_FixedSpaceMixin, optuna.samplers.NSGAIISampler):
        """NSGA-II with a fixed relative search space and an incremental generation count.

        Optuna's ``get_trial_generation`` scans every finished trial for each new one (quadratic in the
        study size); this keeps the per-generation counts of completed trials and scans only the trials
        added or finished since the last call. The result is the same: a new trial joins the highest
        generation until that has ``population_size`` completed members, then opens the next.
        """

        def get_trial_generation(self, study: Any, trial: Any) -> int:
            key = self._get_generation_key()
            generation = trial.system_attrs.get(key, None)
            if generation is not None:
                return generation
            state = getattr(self, "_generation_state", None)
            if state is None or state["study"] != study._study_id:
                state = {"study": study._study_id, "cursor": 0, "seen": set(), "per_generation": {}}
                self._generation_state = state
            seen, per_generation = state["seen"], state["per_generation"]
            complete = optuna.trial.TrialState.COMPLETE
            settled = True
            for t in study.get_trials(deepcopy=False)[state["cursor"] :]:
                if t.number not in seen and t.state.is_finished():
                    seen.add(t.number)
                    if t.state == complete:
                        g = t.system_attrs.get(key, -1)
                        per_generation[g] = per_generation.get(g, 0) + 1
                settled = settled and t.number in seen
                if settled:
                    state["cursor"] = t.number + 1
            top = max((g for g in per_generation if g >= 0), default=0)
            generation = top if per_generation.get(top, 0) < self._population_size else top + 1
            study._storage.set_trial_system_attr(trial._trial_id, key, generation)
            return generation

        def get_parent_population(self, study: Any, generation: int) -> list[Any]:
            """Optuna's parent population, remembered per generation (it scans every trial on each call)."""
            cache = getattr(self, "_parent_cache", None)
            if cache is None or cache[0] != study._study_id:
                cache = (study._study_id, {})
                self._parent_cache = cache
            if generation not in cache[1]:
                cache[1][generation] = super().get_parent_population(study, generation)
            return cache[1][generation]

    class FixedSpaceTPE(_FixedSpaceMixin, optuna.samplers.TPESampler):
        """Multivariate TPE with a fixed relative search space."""

    return FixedSpaceNSGAII, FixedSpaceTPE


def make_sampler(
    name: str,
    seed: int | None,
    population_size: int = 100,
    search_space: dict[str, Any] | None = None,
    mutation_prob: float | None = None,
) -> Any:
    """An Optuna sampler by name (passed explicitly: Optuna 5's multi-objective default is TPE).

    ``search_space`` (parameter name -> distribution) fixes the NSGA-II/TPE relative search space.
    ``mutation_prob`` is NSGA-II's per-parameter mutation probability (Optuna's default: 1/parameters).
    """
    import optuna

    if name == "nsga2":
        nsga_cls, _ = _fixed_space_classes()
        sampler = nsga_cls(population_size=population_size, seed=seed, mutation_prob=mutation_prob)
        sampler.fixed_space = _non_single(search_space)
        return sampler
    if name == "tpe":
        _, tpe_cls = _fixed_space_classes()
        sampler = tpe_cls(seed=seed, multivariate=True, n_startup_trials=population_size)
        sampler.fixed_space = _non_single(search_space)
        return sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise PlacementSearchError(
                "the gp sampler needs torch (pip install 'placement-search[runtime]')"
            ) from None
        return optuna.samplers.GPSampler(seed=seed)
    raise PlacementSearchError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def _non_single(space: dict[str, Any] | None) -> dict[str, Any] | None:
    if space is None:
        return None
    return {k: d for k, d in space.items() if not d.single()}


# -- the local-search polish ------------------------------------------------------------------------


def _allowed_matrix(space: SearchSpace) -> np.ndarray:
    allowed = np.zeros((space.num_layers, space.num_mixers), dtype=bool)
    for i in range(space.num_layers):
        allowed[i, [space.index(x) for x in space.allowed_at(i)]] = True
    return allowed


def neighbours(members: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Every single-layer change, two-layer swap and adjacent two-layer change of each row of ``members``.

    ``members [F, N]`` mixer indices; ``allowed [N, M]`` which mixers each layer may use (pins and forbids
    already applied). Returns the distinct-from-parent neighbours ``[K, N]`` (int8; duplicates possible).
    """
    members = np.asarray(members, dtype=np.int8)
    n = members.shape[1]
    m = allowed.shape[1]
    out = []
    # single-layer changes
    layer, mixer = np.nonzero(allowed)
    x = np.repeat(members[:, None, :], layer.size, axis=1)  # [F, L, N]
    x[:, np.arange(layer.size), layer] = mixer
    keep = members[:, layer] != mixer[None, :]
    out.append(x[keep])
    # swaps of two layers' mixers (counts unchanged)
    i, j = np.triu_indices(n, 1)
    a, b = members[:, i], members[:, j]
    ok = (a != b) & allowed[j[None, :], a] & allowed[i[None, :], b]
    if ok.any():
        rows, pairs = np.nonzero(ok)
        x = members[rows].copy()
        x[np.arange(rows.size), i[pairs]] = b[rows, pairs]
        x[np.arange(rows.size), j[pairs]] = a[rows, pairs]
        out.append(x)
    # adjacent two-layer changes (both layers change)
    if n > 1:
        grid = np.array([(layer_, p, q) for layer_ in range(n - 1) for p in range(m) for q in range(m)
                         if allowed[layer_, p] and allowed[layer_ + 1, q]], dtype=np.int64).reshape(-1, 3)
        ok = (members[:, grid[:, 0]] != grid[None, :, 1]) & (members[:, grid[:, 0] + 1] != grid[None, :, 2])
        rows, cols = np.nonzero(ok)
        if rows.size:
            x = members[rows].copy()
            x[np.arange(rows.size), grid[cols, 0]] = grid[cols, 1]
            x[np.arange(rows.size), grid[cols, 0] + 1] = grid[cols, 2]
            out.append(x)
    return np.concatenate(out) if out else np.zeros((0, n), dtype=np.int8)


def count_violation(counts: np.ndarray, constraints: Constraints, mixers: Sequence[str]) -> np.ndarray:
    """Total count and lone-layer violation of each count row ``[P, M]`` (0: satisfied)."""
    counts = np.asarray(counts)
    out = np.zeros(counts.shape[0])
    col = {name: k for k, name in enumerate(mixers)}
    for name, lo in constraints.min_count.items():
        out += np.maximum(0, lo - counts[:, col[name]])
    for name, hi in constraints.max_count.items():
        out += np.maximum(0, counts[:, col[name]] - hi)
    for name in constraints.no_single:
        out += counts[:, col[name]] == 1
    return out


def _unique_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    view = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first = np.unique(view, return_index=True)
    return np.sort(first)


@dataclass
class PolishResult:
    """The polished archive (non-dominated, feasible) and what the polish cost."""

    indices: np.ndarray  # [P, N] int8
    quality: np.ndarray
    speed: np.ndarray
    rounds: int
    evaluations: int
    seconds: float


def polish_front(
    indices: np.ndarray,
    space: SearchSpace,
    quality: ArrayFn,
    speed: ArrayFn,
    *,
    constraints: Constraints | None = None,
    max_rounds: int = 100,
    time_limit_s: float | None = None,
    members_per_batch: int = 64,
    archive_depth: int = 2,
    restarts: int = 3,
    kicks: int = 128,
    kick_layers: int = 12,
    seed: int | None = 0,
) -> PolishResult:
    """Pareto local search from ``indices [P, N]`` (feasible placements of ``space``, pins/forbids applied).

    Each round scores the :func:`neighbours` of the archive members added in the previous round with
    ``quality`` and ``speed`` (batch functions on index rows), keeps the feasible ones, and replaces the
    archive by the first ``archive_depth`` non-dominated fronts of archive and neighbours (a second front
    keeps near-optimal stepping stones that a strict Pareto archive would drop). Returns the first front. Stops when a round adds nothing, after
    ``max_rounds``, or once ``time_limit_s`` is exceeded (checked between batches).
    """
    constraints = constraints or Constraints()
    start = time.perf_counter()
    allowed = _allowed_matrix(constraints.restrict(space))
    x = np.asarray(indices, dtype=np.int8).reshape(-1, space.num_layers)
    x = x[_unique_rows(x)]
    q, s = quality(x), speed(x)
    ok = ~np.isnan(s) & (count_violation(index_counts(x, space.num_mixers), constraints, space.mixers) <= 0)
    x, q, s = x[ok], q[ok], s[ok]
    keep = _leading_fronts(np.stack([q, s], axis=1), archive_depth)
    x, q, s = x[keep], q[keep], s[keep]
    frontier = np.ones(len(x), dtype=bool)
    evaluations, rounds = len(ok), 0
    rng = np.random.default_rng(seed)

    def score(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sp = speed(rows)
        fine = ~np.isnan(sp) & (count_violation(index_counts(rows, space.num_mixers), constraints, space.mixers) <= 0)
        qu = np.full(len(rows), -np.inf)
        if fine.any():
            qu[fine] = quality(rows[fine])
        return qu, sp

    for _ in range(restarts + 1):
        while frontier.any() and rounds < max_rounds:
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                break
            rounds += 1
            parents = x[frontier]
            cand_x, cand_q, cand_s = [x], [q], [s]
            for b in range(0, len(parents), members_per_batch):
                if time_limit_s is not None and b and time.perf_counter() - start > time_limit_s:
                    break
                nb = neighbours(parents[b : b + members_per_batch], allowed)
                nb = nb[_unique_rows(nb)]
                sp = speed(nb)
                fine = ~np.isnan(sp) & (count_violation(index_counts(nb, space.num_mixers), constraints, space.mixers) <= 0)
                nb, sp = nb[fine], sp[fine]
                qu = quality(nb)
                evaluations += len(nb)
                # cheap pre-filter: only neighbours not dominated by the current archive can matter
                front_obj = np.stack([q, s], axis=1)
                order = np.argsort(-front_obj[:, 1])
                best_q = np.maximum.accumulate(front_obj[order, 0])
                pos = np.searchsorted(-front_obj[order, 1], -sp, side="right")  # archive points at least as fast
                dominated = (pos > 0) & (best_q[np.maximum(pos - 1, 0)] >= qu) if archive_depth == 1 else np.zeros(len(qu), bool)
                cand_x.append(nb[~dominated])
                cand_q.append(qu[~dominated])
                cand_s.append(sp[~dominated])
            all_x, all_q, all_s = np.concatenate(cand_x), np.concatenate(cand_q), np.concatenate(cand_s)
            keep = _leading_fronts(np.stack([all_q, all_s], axis=1), archive_depth)  # archive rows first: ties keep them
            new = keep.copy()
            new[: len(x)] = False
            x, q, s = all_x[keep], all_q[keep], all_s[keep]
            frontier = new[keep]

        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            break
        # kick: climb quality alone from perturbed copies of archive members, then search from what it finds.
        # Half start from the best member (the slow, high-quality end of the front is where a Pareto local
        # search most often stalls); half from members drawn along the front, whose climbs cross stretches
        # that single moves cannot (under max_fit the batch jumps with the attention count, leaving gaps).
        first = np.flatnonzero(pareto_mask(np.stack([q, s], axis=1)))
        bases = np.concatenate([np.full(kicks - kicks // 2, np.argmax(q)), rng.choice(first, kicks // 2)])
        starts = x[bases].copy()
        for row in starts:
            size = int(rng.integers(2, max(kick_layers, 2) + 1))
            layers = rng.choice(space.num_layers, size=min(size, space.num_layers), replace=False)
            for layer in layers:
                row[layer] = rng.choice(np.flatnonzero(allowed[layer]))
        cx, cq, cs = _climb(starts, allowed, score)
        evaluations += int(cx.shape[0]) * int(allowed.sum())
        all_x, all_q, all_s = np.concatenate([x, cx]), np.concatenate([q, cq]), np.concatenate([s, cs])
        keep = _leading_fronts(np.stack([all_q, all_s], axis=1), archive_depth)
        new = keep.copy()
        new[: len(x)] = False
        if not new.any():
            break
        x, q, s = all_x[keep], all_q[keep], all_s[keep]
        frontier = new[keep]
    top = pareto_mask(np.stack([q, s], axis=1))
    return PolishResult(x[top], q[top], s[top], rounds, evaluations, time.perf_counter() - start)


def _climb(
    starts: np.ndarray,
    allowed: np.ndarray,
    score: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    max_steps: int = 200,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steepest-ascent hill climbing of quality alone over single-layer changes, all starts at once.

    ``score(rows)`` returns quality and speed, quality ``-inf`` where a row is infeasible. Returns every
    feasible placement the climbs stepped on, so the caller can keep the non-dominated ones.
    """
    cur = np.asarray(starts, dtype=np.int8)
    cur_q, cur_s = score(cur)
    ok = np.isfinite(cur_q)
    cur, cur_q, cur_s = cur[ok], cur_q[ok], cur_s[ok]
    seen_x, seen_q, seen_s = [cur], [cur_q], [cur_s]
    layer, mixer = np.nonzero(allowed)
    for _ in range(max_steps):
        if len(cur) == 0:
            break
        nb = np.repeat(cur[:, None, :], layer.size, axis=1)
        nb[:, np.arange(layer.size), layer] = mixer
        nq, ns = score(nb.reshape(-1, cur.shape[1]))
        nq = nq.reshape(len(cur), layer.size)
        arg = nq.argmax(axis=1)
        best = nq[np.arange(len(cur)), arg]
        improved = best > cur_q + 1e-12
        if not improved.any():
            break
        rows = np.flatnonzero(improved)
        cur = nb[rows, arg[rows]]
        cur_q = best[rows]
        cur_s = ns.reshape(-1, layer.size)[rows, arg[rows]]
        seen_x.append(cur)
        seen_q.append(cur_q)
        seen_s.append(cur_s)
    return np.concatenate(seen_x), np.concatenate(seen_q), np.concatenate(seen_s)


def _leading_fronts(objectives: np.ndarray, depth: int) -> np.ndarray:
    """Mask of the rows on the first ``depth`` non-dominated fronts (both objectives maximised)."""
    keep = np.zeros(len(objectives), dtype=bool)
    rest = np.arange(len(objectives))
    for _ in range(depth):
        if rest.size == 0:
            break
        mask = pareto_mask(objectives[rest])
        keep[rest[mask]] = True
        rest = rest[~mask]
    return keep


# -- the study --------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """A finished (or resumed) study and its feasible Pareto front."""

    study: Any
    front: pd.DataFrame  # placement, quality, quality_std, tokens_per_s, counts..., trial
    trials: int
    seconds: float = 0.0
    polish: PolishResult | None = None

    def hypervolume(self, reference: tuple[float, float]) -> float:
        """Area dominated by the front in (quality, tokens/s) above ``reference``."""
        if self.front.empty:
            return 0.0
        return hypervolume(self.front[["quality", "tokens_per_s"]].to_numpy(), reference)


def default_seeds(space: SearchSpace) -> list[Placement]:
    """All-X and the structured family (periodic, first/last-k): known placements to start a search from."""
    from placement_search.sampling import structured_family

    return structured_family(space)


def run_search(
    space: SearchSpace,
    quality: QualityFn,
    speed: SpeedFn,
    *,
    constraints: Constraints | None = None,
    sampler: str = "nsga2",
    n_trials: int = 5000,
    population_size: int = 100,
    seed: int | None = 0,
    seeds: Iterable[Placement] = (),
    structured_seeds: bool = True,
    polish: bool = True,
    polish_fraction: float = 0.2,
    polish_time_s: float | None = None,
    mutation_prob: float | None = None,
    storage: Any = None,
    study_name: str | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) a study of ``n_trials`` more trials and return its feasible Pareto front.

    ``seeds`` (a previous front, say) are enqueued first, then with ``structured_seeds`` all-X and the
    structured family; duplicates of finished trials are skipped, seeds outside the (restricted) space
    dropped. With ``polish`` the evolutionary phase stops ``polish_fraction`` of the budget early, the front
    is improved by :func:`polish_front` (at most ``polish_time_s``; default 4 ms per trial, <= 20 s), and its new placements are told as
    trials; any budget left goes back to the sampler. ``timeout_s`` stops the sampler after the generation
    in progress once exceeded (the polish still runs).
    """
    import optuna
    from tqdm.auto import tqdm

    if n_trials < 0:
        raise PlacementSearchError(f"the number of trials must be >= 0, got {n_trials}")
    if not 0.0 <= polish_fraction < 1.0:
        raise PlacementSearchError(f"polish_fraction must be in [0, 1), got {polish_fraction}")
    constraints = constraints or Constraints()
    restricted = constraints.restrict(space)
    names = [param_name(i, space.num_layers) for i in range(space.num_layers)]
    choices = [list(restricted.allowed_at(i)) for i in range(space.num_layers)]
    distributions = {
        n: optuna.distributions.CategoricalDistribution(c) for n, c in zip(names, choices, strict=True)
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["maximize", "maximize"],
        sampler=make_sampler(sampler, seed, population_size, distributions, mutation_prob),
        storage=storage,
        study_name=study_name,
        load_if_exists=study_name is not None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["quality", "tokens_per_s"])
    seed_list = list(seeds) + (default_seeds(space) if structured_seeds else [])
    resumed = len(study.get_trials(deepcopy=False)) > 0
    for p in _fit_seeds(seed_list, space, choices):  # deduplicated here; against old trials only when resuming
        study.enqueue_trial(dict(zip(names, p.mixers, strict=True)), skip_if_exists=resumed)

    start = time.perf_counter()
    bar = tqdm(total=n_trials, desc=f"search ({sampler})", unit="trial", disable=not progress, leave=False)
    done = 0

    def evolve(budget: int) -> None:
        nonlocal done
        while done < budget:
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                break
            batch = [study.ask(distributions) for _ in range(min(population_size, budget - done))]
            placements = [_placement(t.params, names, space) for t in batch]
            _tell(study, batch, placements, quality, speed, constraints)
            done += len(batch)
            bar.update(len(batch))

    polished = None
    if polish_time_s is None:  # scale with the budget: 20 s at the default 5000 trials
        polish_time_s = min(20.0, 0.004 * n_trials)
    if polish and n_trials > 0:
        evolve(n_trials - round(polish_fraction * n_trials))
        polished = _polish_study(study, space, quality, speed, constraints, polish_time_s)
        fresh = _new_placements(study, space, polished, names)
        room = n_trials - done
        if len(fresh) > room:  # keep an even spread along the speed axis
            order = np.argsort([f[1] for f in fresh])
            pick = np.unique(np.linspace(0, len(fresh) - 1, room).round().astype(int)) if room else []
            fresh = [fresh[order[i]] for i in pick]
        for b in range(0, len(fresh), population_size):
            chunk = [f[0] for f in fresh[b : b + population_size]]
            batch = []
            for p in chunk:
                study.enqueue_trial(dict(zip(names, p.mixers, strict=True)))
                batch.append(study.ask(distributions))
            placements = [_placement(t.params, names, space) for t in batch]
            _tell(study, batch, placements, quality, speed, constraints)
            done += len(batch)
            bar.update(len(batch))
    evolve(n_trials)
    bar.close()
    front = front_table(study, space)
    return SearchResult(study=study, front=front, trials=done, seconds=time.perf_counter() - start, polish=polished)


def _placement(params: dict[str, Any], names: list[str], space: SearchSpace) -> Placement:
    return Placement([params[n] for n in names], space)


def _fit_seeds(seeds: Iterable[Placement], space: SearchSpace, choices: list[list[str]]) -> list[Placement]:
    out: dict[Placement, None] = {}
    for p in seeds:
        try:
            p = Placement(p.mixers, space)
        except PlacementSearchError:
            continue
        if all(p[i] in choices[i] for i in range(space.num_layers)):
            out.setdefault(p, None)
    return list(out)


def _tell(
    study: Any,
    batch: list[Any],
    placements: list[Placement],
    quality: QualityFn,
    speed: SpeedFn,
    constraints: Constraints,
) -> None:
    """Score one generation in one call of each model and tell the study (constraints, std, values)."""
    q, q_std = quality(placements)
    thr = speed(placements)
    for i, (trial, p) in enumerate(zip(batch, placements, strict=True)):
        fits = not math.isnan(thr[i])
        for key, value in constraints.violations(p).items():
            trial.set_constraint(key, value)
        trial.set_constraint("fits_memory", 0.0 if fits else 1.0)
        if q_std is not None:
            trial.set_user_attr("quality_std", float(q_std[i]))
        study.tell(trial, [float(q[i]), float(thr[i]) if fits else 0.0])


#: Polish repeats in a row that may add nothing before :func:`run_search`'s polish stops early (see ``_polish_study``).
POLISH_IDLE_REPEATS = 2


def _polish_study(
    study: Any,
    space: SearchSpace,
    quality: QualityFn,
    speed: SpeedFn,
    constraints: Constraints,
    time_limit_s: float | None,
) -> PolishResult | None:
    front = front_table(study, space)
    if front.empty:
        return None
    idx = np.stack([Placement.parse(c, space).indices() for c in front["placement"]])
    qf, sf = array_quality(quality, space), array_speed(speed, space)
    start = time.perf_counter()
    result = polish_front(idx, space, qf, sf, constraints=constraints, time_limit_s=time_limit_s)
    # polish again from the converged front alone, while time is left: the archive's second front (stepping
    # stones) goes stale at convergence and blocks candidates a fresh archive keeps (synthetic benchmark, 32K
    # fixed:16 seed 1: hypervolume 0.9932 -> 0.9998 of the exact front, 2.5 s). Each repeat kicks with fresh
    # random perturbations (seed = the repeat's number, so runs stay reproducible); it stops after
    # POLISH_IDLE_REPEATS repeats in a row add nothing (with the same kicks every time, one fruitless repeat ended
    # it: synthetic 16K fixed:16 seed 1 stopped at 0.9950 after 8 of its 20 s, session 8's cost table).
    repeat = idle = 0
    while result.indices.shape[0]:
        left = None if time_limit_s is None else time_limit_s - (time.perf_counter() - start)
        if left is not None and left <= 0.5:
            break
        repeat += 1
        again = polish_front(result.indices, space, qf, sf, constraints=constraints, time_limit_s=left, seed=repeat)
        gained = set(map(bytes, again.indices)) - set(map(bytes, result.indices))
        result = PolishResult(again.indices, again.quality, again.speed, result.rounds + again.rounds,
                              result.evaluations + again.evaluations, time.perf_counter() - start)  # fmt: skip
        idle = 0 if gained else idle + 1
        if idle >= POLISH_IDLE_REPEATS:
            break
    return result


def _new_placements(
    study: Any, space: SearchSpace, polished: PolishResult | None, names: list[str]
) -> list[tuple[Placement, float]]:
    """The polished archive's placements the study has not tried yet, with their speed."""
    if polished is None:
        return []
    import optuna

    seen = {
        tuple(t.params.get(n) for n in names)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    }
    out = []
    for row, s in zip(placements_from_indices(polished.indices, space), polished.speed, strict=True):
        if tuple(row.mixers) not in seen:
            out.append((row, float(s)))
    return out


def _feasible(trial: Any) -> bool:
    return all(v <= 0 for k, v in trial.system_attrs.items() if k.startswith(_CONSTRAINT_PREFIX))


def front_table(study: Any, space: SearchSpace) -> pd.DataFrame:
    """The feasible Pareto trials of ``study`` as a table sorted by throughput (one row per placement)."""
    import optuna

    names = [param_name(i, space.num_layers) for i in range(space.num_layers)]
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.values is not None and _feasible(t)
    ]
    if not trials:
        return pd.DataFrame()
    obj = np.array([t.values for t in trials], dtype=float)
    rows = []
    for k in np.flatnonzero(pareto_mask(obj)):
        t = trials[k]
        if all(n in t.params for n in names):
            p = Placement([t.params[n] for n in names], space)
        else:
            p = Placement.parse(t.user_attrs["code"], space)
        rows.append(
            {
                "placement": p.code(),
                "quality": t.values[0],
                "quality_std": t.user_attrs.get("quality_std", float("nan")),
                "tokens_per_s": t.values[1],
                **{f"n_{m}": c for m, c in p.counts().items()},
                "trial": t.number,
            }
        )
    frame = pd.DataFrame(rows).drop_duplicates("placement")
    return frame.sort_values("tokens_per_s").reset_index(drop=True)


DEFAULT_LEVELS = (1.5, 2.0, 3.0, 5.0, 7.0, 10.0)


def choose_presets(
    front: pd.DataFrame, levels: Sequence[float] = DEFAULT_LEVELS, tie_tolerance: float = 0.0
) -> pd.DataFrame:
    """Per speed level, the best predicted quality among placements at least that fast.

    ``front`` needs ``quality``, ``speedup`` and (optionally) ``quality_std``. Placements within
    ``tie_tolerance`` of the best quality count as tied; the tie goes to the smallest ``quality_std``
    (the more certain prediction). Levels that nothing reaches are left out.
    """
    rows = []
    for level in levels:
        ok = front[front["speedup"] >= level]
        if ok.empty:
            continue
        best = ok["quality"].max()
        tied = ok[ok["quality"] >= best - tie_tolerance]
        if "quality_std" in tied and tied["quality_std"].notna().any():
            pick = tied.sort_values(
                ["quality_std", "quality"], ascending=[True, False], na_position="last"
            ).iloc[0]
        else:
            pick = tied.sort_values("quality", ascending=False).iloc[0]
        rows.append({"level": level, **pick.to_dict()})
    return pd.DataFrame(rows)
