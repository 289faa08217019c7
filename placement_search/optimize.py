"""``placement-search optimize``: from an evaluation table to a front, presets, a CSV and a plot.

:func:`optimize` reads an evaluation table (placement + score columns, as ``placement-search fit`` reads
it: :mod:`placement_search.surrogate.table`), fits a surrogate (:data:`DEFAULT_SURROGATE`: a bootstrap ensemble of
XGBoost models on the one-hot plus mixer counts, whose spread gives each preset its uncertainty; any name of
:mod:`placement_search.surrogate.registry`), predicts decode throughput with a cost table at one context
length, batch policy and memory budget (:class:`~placement_search.search.TableSpeed`), applies the
constraints, and finds the (quality, throughput) front:

* ``solver="search"`` (default): an Optuna study (:func:`placement_search.search.run_search`, NSGA-II by
  default) seeded with all-X and the structured family, with a local-search polish;
* ``solver="dp"``: the exact front by dynamic programming over layers, for surrogates that are a cluster
  expansion or linear (``unary_``/``pair_``/``intercept_``). The throughput of the shipped tables depends
  on the mixer counts only, so :func:`~placement_search.exact_front.exact_front_by_counts` is exact under
  every batch policy; count constraints become infeasible count vectors, pins and forbids restrict the space.

Then it picks presets at speed levels over all-attention (best predicted quality meeting each level, ties
toward the smaller uncertainty) and writes, atomically, ``presets.json`` (the Foundation format, with
provenance), ``front.csv`` and ``front.png``.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from placement_search.constraints import Constraints
from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement
from placement_search.search import DEFAULT_LEVELS, SAMPLERS, choose_presets

#: The shipped evaluation table of the dev supernet (filled by the evaluator's campaign), relative to the
#: repository root; ``placement-search optimize`` without ``--evaluations`` uses it when it exists.
DEFAULT_EVALUATIONS = Path("results/evaluations/devnet-final.csv")
REPO_ROOT = Path(__file__).resolve().parents[1]
SOLVERS = ("search", "dp")
DEFAULT_TRIALS = 5000
#: The default surrogate: on the shipped dev-supernet table it ranks best (``results/surrogate_comparison_devnet.md``:
#: k-fold Spearman 0.983, precision@top-10% >= 0.80 in every speed bucket, 90% intervals covering 90%), and as an
#: ensemble it gives every preset the uncertainty its tie-break uses.
DEFAULT_SURROGATE = "ensemble-xgb-counts"


class EvaluationsMissing(PlacementSearchError):
    """No ``--evaluations`` given and the shipped default table is not there."""


def default_evaluations() -> Path:
    """Where the shipped evaluations live (``PLACEMENT_SEARCH_EVALUATIONS`` overrides)."""
    env = os.environ.get("PLACEMENT_SEARCH_EVALUATIONS")
    return Path(env) if env else REPO_ROOT / DEFAULT_EVALUATIONS


def resolve_evaluations(path: str | os.PathLike[str] | None) -> Path:
    """``path``, or the shipped default when it exists; else :class:`EvaluationsMissing`."""
    if path is not None:
        return Path(path)
    default = default_evaluations()
    if default.is_file():
        return default
    raise EvaluationsMissing(
        f"the shipped dev-supernet evaluations are missing ({default}: is this a complete checkout?); "
        "pass --evaluations TABLE (placement and score columns)"
    )


def parse_levels(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"1.5,2,3"`` (or numbers) -> sorted distinct speed-up levels, each > 0."""
    if isinstance(text, str):
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise PlacementSearchError(f"levels {text!r}: use comma-separated numbers such as 1.5,2,3") from None
    else:
        values = [float(v) for v in text]
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise PlacementSearchError(f"levels must be positive numbers, got {text!r}")
    return tuple(sorted(set(values)))


@dataclass
class OptimizeResult:
    """What :func:`optimize` found and wrote."""

    front: pd.DataFrame
    presets: pd.DataFrame
    hypervolume: float
    reference: tuple[float, float]
    paths: dict[str, Path]
    seconds: float
    solver: str
    trials: int
    notes: list[str] = field(default_factory=list)


def optimize(
    evaluations: str | os.PathLike[str] | None = None,
    *,
    target: str = "score",
    model: str | None = None,
    cost_table: str | os.PathLike[str] | None = None,
    context: int = 32768,
    batch_policy: str = "max_fit",
    memory_gib: float | None = None,
    levels: Sequence[float] | str = DEFAULT_LEVELS,
    constraints: Sequence[str] = (),
    no_single: Sequence[str] = (),
    surrogate: str = DEFAULT_SURROGATE,
    sampler: str = "nsga2",
    solver: str = "search",
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    out: str | os.PathLike[str] = "out/optimize",
    storage: Any = None,
    study_name: str | None = None,
    command: str | None = None,
    progress: bool = True,
    polish_time_s: float | None = None,
) -> OptimizeResult:
    """Fit, search, pick presets and write them (see the module docstring). User errors raise
    :class:`~placement_search.errors.PlacementSearchError` with one line."""
    from tqdm.auto import tqdm

    from placement_search.cli.throughput import default_table
    from placement_search.evaluators.cost_model import CostTable
    from placement_search.presets import BatchPolicy
    from placement_search.search import TableSpeed, run_search, surrogate_quality
    from placement_search.spec import DEFAULT_SPEC, get_spec
    from placement_search.surrogate import registry, table

    start = time.perf_counter()
    if solver not in SOLVERS:
        raise PlacementSearchError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    if sampler not in SAMPLERS:
        raise PlacementSearchError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if trials < 1:
        raise PlacementSearchError(f"--trials must be at least 1, got {trials}")
    if context < 1:
        raise PlacementSearchError(f"--context must be a positive number of tokens, got {context}")
    if memory_gib is not None and not memory_gib > 0:
        raise PlacementSearchError(f"--memory-gib must be positive, got {memory_gib:g}")
    level_values = parse_levels(levels)
    path = resolve_evaluations(evaluations)
    spec = get_spec(model or DEFAULT_SPEC)
    space = spec.search_space
    policy = BatchPolicy.parse(batch_policy)
    cost_path = Path(cost_table) if cost_table else default_table(model or DEFAULT_SPEC)
    cons = Constraints.parse(list(constraints), space, no_single=list(no_single))
    steps = tqdm(total=4, desc="optimize", unit="step", disable=not progress, leave=False)

    steps.set_postfix_str("fit")
    data = table.load_evaluation_table(path, space, target=target, source=str(path))
    if len(data) < 2:
        raise PlacementSearchError(f"{path}: {len(data)} rows; a surrogate needs at least 2")
    fitted = registry.make_surrogate(surrogate, seed).fit(data.placements, data.y)
    quality = surrogate_quality(fitted, space.num_mixers)
    steps.update()

    steps.set_postfix_str("cost model")
    try:
        costs = CostTable.load(cost_path)
        costs.check_spec(spec)
    except PlacementSearchError as e:
        raise PlacementSearchError(f"--cost-table {cost_path}: {e}") from None
    speed = TableSpeed(costs, spec, int(context), policy, memory_gib)
    steps.update()

    steps.set_postfix_str(solver)
    notes: list[str] = []
    if solver == "dp":
        front, n_trials = _dp_front(fitted, quality, speed, space, cons), 0
    else:
        result = run_search(
            space,
            quality,
            speed,
            constraints=cons,
            sampler=sampler,
            n_trials=trials,
            seed=seed,
            storage=storage,
            study_name=study_name,
            progress=progress,
            polish_time_s=polish_time_s,
        )
        front, n_trials = result.front, result.trials
        if result.polish is not None:
            notes.append(
                f"polish: {result.polish.rounds} rounds, {result.polish.evaluations} placements scored "
                f"in {result.polish.seconds:.1f} s"
            )
    if front.empty:
        raise PlacementSearchError("no feasible placement found: loosen the constraints or the memory budget")
    front = front.copy()
    front["speedup"] = speed.speedup(front["tokens_per_s"].to_numpy())
    steps.update()

    steps.set_postfix_str("presets")
    baselines = [Placement.uniform(m, space) for m in space.mixers if _offers_everywhere(space, m)]
    ref_q = float(np.min(quality(baselines)[0])) if baselines else float(front["quality"].min())
    reference = (min(ref_q, float(front["quality"].min())), 0.0)
    from placement_search.pareto import hypervolume

    hv = hypervolume(front[["quality", "tokens_per_s"]].to_numpy(), reference)
    picks = choose_presets(front, level_values)
    if picks.empty:
        raise PlacementSearchError(
            f"no placement on the front reaches {min(level_values):g}x all-attention "
            f"(fastest: {front['speedup'].max():.2f}x)"
        )
    out_dir = Path(out)
    paths = _write_outputs(
        out_dir,
        spec=spec,
        front=front,
        picks=picks,
        speed=speed,
        target=target,
        surrogate=surrogate,
        fitted=fitted,
        data_path=path,
        data_sha=data.sha256,
        rows=len(data),
        cost_path=cost_path,
        command=command or _command_line(),
        extra={
            "solver": solver,
            "sampler": sampler if solver == "search" else None,
            "trials": n_trials,
            "seed": seed,
            "hypervolume": hv,
            "hypervolume_reference": list(reference),
            "constraints": cons.describe(),
            "levels": list(level_values),
        },
    )
    steps.update()
    steps.close()
    return OptimizeResult(front, picks, hv, reference, paths, time.perf_counter() - start, solver, n_trials, notes)


def _offers_everywhere(space: Any, mixer: str) -> bool:
    return all(mixer in space.allowed_at(i) for i in range(space.num_layers))


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["placement-search", *sys.argv[1:]])


def _dp_front(fitted: Any, quality: Any, speed: Any, space: Any, cons: Constraints) -> pd.DataFrame:
    """The exact front of a cluster-expansion/linear surrogate, by counts (any batch policy)."""
    from placement_search.exact_front import exact_front_by_counts
    from placement_search.search import count_violation

    unary = getattr(fitted, "unary_", None)
    if unary is None:
        raise PlacementSearchError(
            "--solver dp needs a linear or cluster-expansion surrogate (--surrogate ridge, bayes-ridge, cluster or "
            "cluster-ridge)"
        )
    pair = dict(getattr(fitted, "pair_", None) or {})
    intercept = float(getattr(fitted, "intercept_", 0.0))
    restricted = cons.restrict(space)
    mixers = space.mixers

    def by_counts(counts: dict[str, int]) -> float:
        row = np.array([[counts[m] for m in mixers]])
        if count_violation(row, cons, mixers)[0] > 0:
            return float("nan")
        names = [m for m in mixers for _ in range(counts[m])]
        return float(speed.on_indices(np.array([[mixers.index(n) for n in names]]))[0])

    depth = max(pair, default=0)
    cells = space.num_mixers ** min(depth, space.num_layers - 1) * (space.num_layers + 1) ** (space.num_mixers - 1)
    front = exact_front_by_counts(restricted, unary, by_counts, pair, intercept, max_cells=max(cells, 2_000_000))
    placements = [Placement(p.mixers, space) for p in front.placements]
    mean, std = quality(placements)
    rows = [
        {
            "placement": p.code(),
            "quality": float(mean[i]),
            "quality_std": float(std[i]) if std is not None else float("nan"),
            "tokens_per_s": float(front.speed[i]),
            **{f"n_{m}": c for m, c in p.counts().items()},
            "trial": -1,
        }
        for i, p in enumerate(placements)
    ]
    return pd.DataFrame(rows).sort_values("tokens_per_s").reset_index(drop=True)


def _write_outputs(
    out_dir: Path,
    *,
    spec: Any,
    front: pd.DataFrame,
    picks: pd.DataFrame,
    speed: Any,
    target: str,
    surrogate: str,
    fitted: Any,
    data_path: Path,
    data_sha: str | None,
    rows: int,
    cost_path: Path,
    command: str,
    extra: dict[str, Any],
) -> dict[str, Path]:
    """presets.json, front.csv and front.png, each written atomically."""
    from placement_search.files import atomic_open, write_text_atomic
    from placement_search.presets import Figures, Preset, PresetFile, Quality, Throughput, write_presets
    from placement_search.surrogate.table import file_sha256

    presets = []
    for _, row in picks.iterrows():
        p = Placement.parse(row["placement"], spec.search_space)
        pred = speed.prediction(p)
        std = row.get("quality_std")
        figures = Figures(
            quality=Quality(
                metric=target,
                value=float(row["quality"]),
                std=None if std is None or not np.isfinite(std) else float(max(std, 0.0)),
                source=f"surrogate {surrogate} ({type(fitted).__name__})",
            ),
            throughput=Throughput(
                tokens_per_s=round(pred.tokens_per_s, 3),
                speedup=round(float(row["speedup"]), 4),
                batch=pred.batch,
                step_time_ms=round(pred.step_ms, 4),
                source=pred.source,
            ),
        )
        presets.append(
            Preset(
                name=f"{row['level']:g}x",
                placement=p,
                speed_level=float(row["level"]),
                predicted=figures,
                conditions=pred.conditions,
                notes=f"best predicted {target} at >= {row['level']:g}x all-attention",
            )
        )
    preset_file = PresetFile.create(
        spec,
        presets,
        command=command,
        data=[{"path": str(data_path), "sha256": data_sha or file_sha256(data_path), "rows": rows, "target": target}],
        surrogate={"name": surrogate, "class": type(fitted).__name__},
        cost_model={
            "table": str(cost_path),
            "sha256": file_sha256(cost_path),
            "context_length": speed.context,
            "batch_policy": str(speed.policy),
            "memory_budget_gib": speed.memory_gib,
        },
        search=extra,
    )
    paths = {
        "presets": write_presets(preset_file, out_dir / "presets.json"),
        "front": write_text_atomic(out_dir / "front.csv", front.to_csv(index=False, float_format="%.6g")),
    }
    png = out_dir / "front.png"
    with atomic_open(png, "wb") as f:
        _plot(front, picks, target, speed, f)
    paths["plot"] = png
    return paths


def _plot(front: pd.DataFrame, picks: pd.DataFrame, target: str, speed: Any, handle: Any) -> None:
    # a Figure with its own Agg canvas: no pyplot state, and the caller's backend (a notebook's inline) is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(front["speedup"], front["quality"], where="post", color="0.6", lw=1, zorder=1)
    ax.scatter(front["speedup"], front["quality"], s=10, color="tab:blue", label="front", zorder=2)
    ax.scatter(picks["speedup"], picks["quality"], s=60, marker="*", color="tab:red", label="presets", zorder=3)
    for _, row in picks.iterrows():
        ax.annotate(f"{row['level']:g}x", (row["speedup"], row["quality"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"decode speed-up over all-attention (context {speed.context}, {speed.policy})")
    ax.set_ylabel(f"predicted {target}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(handle, format="png")
