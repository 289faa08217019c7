"""Multi-objective placement search: maximise predicted quality and decode throughput with Optuna.

One categorical parameter per layer (``layer_00`` ... ``layer_47``, choices = the mixers the layer may use
after pins and forbids); two objectives, both maximised: the surrogate's predicted quality and the cost
model's throughput (tokens/s) at one condition (context length, batch policy, memory budget, GPU table).
Count and lone-layer constraints go through ``trial.set_constraint`` (Optuna's NSGA-II ranks feasible
trials first and infeasible ones by total violation; ``study.best_trials`` keeps feasible ones only).

The sampler is chosen explicitly (Optuna 5 defaults to TPE for several objectives): ``nsga2`` (default),
``tpe``, ``gp`` (needs torch) or ``random``. Trials are asked and told in generations, so the surrogate and
the cost model score a whole generation in one call. The study lives in any Optuna storage (in memory by
default; a SQLite/PostgreSQL URL or a journal file makes it resumable and watchable with optuna-dashboard).
Known placements (all-X, a previous front) can be enqueued as seeds.
"""

from __future__ import annotations

import math
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

#: Quality of placements: ``(mean [P], std [P] or None)``.
QualityFn = Callable[[Sequence[Placement]], tuple[np.ndarray, np.ndarray | None]]
#: Decode throughput of placements in tokens/s, ``nan`` where a placement does not fit the memory budget.
SpeedFn = Callable[[Sequence[Placement]], np.ndarray]


def param_name(layer: int, num_layers: int) -> str:
    return f"layer_{layer:0{len(str(num_layers - 1))}d}"


def surrogate_quality(model: Any) -> QualityFn:
    """A :data:`QualityFn` from a fitted surrogate (``predict(X, return_std=True)`` when it offers one)."""

    def quality(placements: Sequence[Placement]) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            mean, std = model.predict(list(placements), return_std=True)
            return np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        except TypeError:  # no return_std
            return np.asarray(model.predict(list(placements)), dtype=float), None

    return quality


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

    def speedup(self, tokens_per_s: np.ndarray) -> np.ndarray:
        return np.asarray(tokens_per_s, dtype=float) / self.baseline.tokens_per_s


def make_sampler(name: str, seed: int | None, population_size: int = 100) -> Any:
    """An Optuna sampler by name (passed explicitly: Optuna 5's multi-objective default is TPE)."""
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=population_size)
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


@dataclass
class SearchResult:
    """A finished (or resumed) study and its feasible Pareto front."""

    study: Any
    front: pd.DataFrame  # placement, quality, quality_std, tokens_per_s, speedup, counts..., trial
    trials: int

    def hypervolume(self, reference: tuple[float, float]) -> float:
        """Area dominated by the front in (quality, tokens/s) above ``reference``."""
        return hypervolume(self.front[["quality", "tokens_per_s"]].to_numpy(), reference)


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
    storage: Any = None,
    study_name: str | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) a study of ``n_trials`` more trials and return its feasible Pareto front.

    ``seeds`` are enqueued first (duplicates of finished trials are skipped). ``timeout_s`` stops after the
    generation in progress once exceeded.
    """
    import time

    import optuna
    from tqdm.auto import tqdm

    constraints = constraints or Constraints()
    restricted = constraints.restrict(space)
    names = [param_name(i, space.num_layers) for i in range(space.num_layers)]
    choices = [list(restricted.allowed_at(i)) for i in range(space.num_layers)]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["maximize", "maximize"],
        sampler=make_sampler(sampler, seed, population_size),
        storage=storage,
        study_name=study_name,
        load_if_exists=study_name is not None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["quality", "tokens_per_s"])
    for p in seeds:
        p = Placement(p.mixers, space)
        if all(p[i] in choices[i] for i in range(space.num_layers)):
            study.enqueue_trial(dict(zip(names, p.mixers, strict=True)), skip_if_exists=True)
    start = time.perf_counter()
    done = 0
    bar = tqdm(total=n_trials, desc=f"search ({sampler})", unit="trial", disable=not progress, leave=False)
    while done < n_trials:
        if timeout_s is not None and time.perf_counter() - start > timeout_s:
            break
        batch = [study.ask() for _ in range(min(population_size, n_trials - done))]
        placements = [
            Placement([t.suggest_categorical(n, c) for n, c in zip(names, choices, strict=True)], space)
            for t in batch
        ]
        q, q_std = quality(placements)
        thr = speed(placements)
        for i, (trial, p) in enumerate(zip(batch, placements, strict=True)):
            fits = not math.isnan(thr[i])
            for key, value in constraints.violations(p).items():
                trial.set_constraint(key, value)
            trial.set_constraint("fits_memory", 0.0 if fits else 1.0)
            trial.set_user_attr("code", p.code())
            if q_std is not None:
                trial.set_user_attr("quality_std", float(q_std[i]))
            study.tell(trial, [float(q[i]), float(thr[i]) if fits else 0.0])
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    return SearchResult(study=study, front=front_table(study, space), trials=done)


def front_table(study: Any, space: SearchSpace) -> pd.DataFrame:
    """The feasible Pareto trials of ``study`` as a table sorted by throughput (one row per placement)."""
    rows = []
    for t in study.best_trials:
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
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.drop_duplicates("placement")
    keep = pareto_mask(frame[["quality", "tokens_per_s"]].to_numpy())
    return frame[keep].sort_values("tokens_per_s").reset_index(drop=True)


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
