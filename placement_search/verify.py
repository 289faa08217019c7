"""The verification loop: measure chosen presets, compare with their predictions, feed the measurements back.

:func:`verify_presets` takes a preset file (``placement-search optimize`` writes one) and

1. scores its placements, with all-attention as the retention reference, on a supernet checkpoint and a task pack
   through the quality evaluator's campaign (:func:`placement_search.evaluators.campaign.run_campaign`; results in
   its SQLite database, so a rerun only adds what is missing), and turns the scores into the evaluation table's
   ``score`` (mean retention against all-attention, :mod:`placement_search.evaluators.dataset`);
2. optionally measures each preset's decode throughput on the local GPU under the preset's own conditions (context,
   batch policy, memory budget; :func:`placement_search.evaluators.throughput.measure_throughput`);
3. writes ``presets.verified.json`` (the presets with ``measured`` filled in), ``verify.csv`` (predicted vs
   measured, with the error in units of the predicted standard deviation) and, given the evaluation table the
   surrogate was fitted on, ``evaluations.csv``: that table plus the verified placements not yet in it (sampler
   ``verified``), ready for ``placement-search optimize --evaluations`` (``refit=True`` runs it).

Torch is imported only by the evaluators this calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from placement_search.errors import PlacementSearchError
from placement_search.files import atomic_open, load_json
from placement_search.placement import Placement
from placement_search.presets import Figures, PresetFile, Quality, Throughput, read_presets, write_presets
from placement_search.spec import ModelSpec


@dataclass
class VerifyResult:
    """The report (one row per preset) and the files written."""

    report: pd.DataFrame
    paths: dict[str, Path]
    notes: list[str] = field(default_factory=list)


def _check_space(presets: PresetFile, spec: ModelSpec, where: str) -> None:
    space = spec.search_space
    if presets.space.num_layers != space.num_layers or set(presets.space.mixers) != set(space.mixers):
        raise PlacementSearchError(
            f"{where}: {space.num_layers} layers of {', '.join(space.mixers)}, but the presets are for "
            f"{presets.space.num_layers} layers of {', '.join(presets.space.mixers)}"
        )


def measured_scores(
    checkpoint: str | os.PathLike[str],
    tasks: str | os.PathLike[str],
    placements: Sequence[Placement],
    db: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate ``placements`` and all-attention on ``tasks``; their wide table (placement, score, task scores)."""
    from placement_search.evaluators.campaign import run_campaign
    from placement_search.evaluators.dataset import sample_set_name, tidy_results, wide_scores
    from placement_search.evaluators.tasks import load_pack_manifest

    space = placements[0].space
    reference = Placement([space.mixers[0] if "attention" not in space.mixers else "attention"] * space.num_layers,
                          space)  # fmt: skip
    run_campaign(checkpoint, tasks, [reference, *placements], db, device=device, dtype=dtype, batch_size=batch_size,
                 progress=progress)  # fmt: skip
    manifest = load_pack_manifest(tasks)
    part = (manifest.get("settings", {}).get("corpus", {}) or {}).get("part")
    return wide_scores(tidy_results(db, manifest), Path(checkpoint).name, sample_set_name(part))


def verify_presets(
    presets: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    tasks: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] = "out/verify",
    db: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 16,
    measure_throughput: bool = False,
    evaluations: str | os.PathLike[str] | None = None,
    target: str = "score",
    progress: bool = True,
) -> VerifyResult:
    """Measure the presets of ``presets`` (module docstring)."""
    pf = read_presets(presets)
    ckpt = Path(checkpoint)
    if not (ckpt / "config.json").is_file():
        raise PlacementSearchError(f"{ckpt}: not a checkpoint directory (no config.json)")
    spec = ModelSpec.from_config(load_json(ckpt / "config.json"), name=ckpt.name)
    _check_space(pf, spec, str(ckpt))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    placements = [Placement(list(p.placement.mixers), spec.search_space) for p in pf.presets]
    wide = measured_scores(ckpt, tasks, placements, db or out_dir / "verify.sqlite", device=device, dtype=dtype,
                           batch_size=batch_size, progress=progress).set_index("placement")  # fmt: skip
    notes: list[str] = []
    speed: dict[str, dict[str, Any]] = {}
    if measure_throughput:
        speed = _measure_speeds(pf)
    rows, updated = [], []
    for preset, placement in zip(pf.presets, placements, strict=True):
        code = placement.code()
        score = float(wide.score.get(code, np.nan))
        pq, pt = preset.predicted.quality, preset.predicted.throughput
        std = pq.std if pq is not None and pq.std else None
        measured_t = speed.get(preset.name)
        rows.append({
            "preset": preset.name, "speed_level": preset.speed_level, "placement": code,
            "predicted_quality": pq.value if pq else np.nan, "predicted_std": std if std is not None else np.nan,
            "measured_quality": score,
            "quality_error": score - pq.value if pq else np.nan,
            "z": (score - pq.value) / std if pq and std else np.nan,
            "predicted_tokens_per_s": pt.tokens_per_s if pt else np.nan,
            "measured_tokens_per_s": measured_t["tokens_per_s"] if measured_t else np.nan,
            "throughput_error": (measured_t["tokens_per_s"] / pt.tokens_per_s - 1) if measured_t and pt else np.nan,
        })  # fmt: skip
        quality = Quality(metric=target, value=score, source=f"campaign on {ckpt.name} ({Path(tasks).name})")
        throughput = Throughput(**measured_t) if measured_t else None
        updated.append(replace(preset, measured=Figures(quality=quality, throughput=throughput)))
    report = pd.DataFrame(rows)
    paths = {"presets": write_presets(replace(pf, presets=tuple(updated)), out_dir / "presets.verified.json")}
    with atomic_open(out_dir / "verify.csv", "w") as f:
        report.to_csv(f, index=False, float_format="%.6g")
    paths["report"] = out_dir / "verify.csv"
    if evaluations is not None:
        paths["evaluations"], added = _augment(evaluations, report, target, out_dir / "evaluations.csv",
                                               spec.search_space)  # fmt: skip
        notes.append(f"{added} verified placements added to the evaluation table")
    return VerifyResult(report, paths, notes)


def _measure_speeds(pf: PresetFile) -> dict[str, dict[str, Any]]:
    """Per preset with conditions: ``Throughput`` fields measured on the local GPU under those conditions."""
    from placement_search.evaluators.throughput import measure_throughput as measure
    from placement_search.spec import get_spec

    spec = get_spec(pf.model_name)
    out = {}
    for preset in pf.presets:
        cond = preset.conditions
        if cond is None:
            continue
        res = measure(spec, preset.placement, cond.context_length, cond.batch_policy, cond.memory_budget_gib)
        m = res["measurement"]
        gpu = res.get("device", {}).get("gpu", "GPU")
        out[preset.name] = {"tokens_per_s": round(float(m.tokens_per_s), 3), "batch": int(m.batch),
                            "step_time_ms": round(float(m.step_ms), 4),
                            "source": f"measured on {gpu}, one CUDA graph per step"}  # fmt: skip
    return out


def _augment(
    table: str | os.PathLike[str], report: pd.DataFrame, target: str, dest: Path, space: Any
) -> tuple[Path, int]:
    """``table`` plus the report's placements it lacks (``sampler`` = ``verified``); returns the path and count."""
    from placement_search.surrogate.table import load_evaluation_table, read_table

    load_evaluation_table(table, space, target=target)  # one-line errors for a bad table
    frame = read_table(table)
    have = {Placement.from_string(str(v), space).code() for v in frame["placement"]}
    new = report[~report.placement.isin(have) & report.measured_quality.notna()].drop_duplicates("placement")
    extra = pd.DataFrame({"placement": new.placement, target: new.measured_quality.map(lambda v: f"{v:.8g}")})
    if "sampler" in frame.columns:
        extra["sampler"] = "verified"
    merged = pd.concat([frame, extra], ignore_index=True).fillna("")
    with atomic_open(dest, "w") as f:
        merged.to_csv(f, index=False)
    return dest, len(extra)
