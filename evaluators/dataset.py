"""The quality dataset as tables: tidy (long) and per-placement (wide) views of a campaign database, and the loader.

A campaign database (:mod:`.campaign`) keys every score by checkpoint hash, placement, task and settings hash.
:func:`tidy_results` turns it into one row per checkpoint, sample set, placement, task and metric, with readable
names: ``checkpoint`` (the checkpoint directory's name: ``supernet`` for the final dev supernet,
``supernet-step000123`` for an intermediate snapshot), ``sample_set`` (``a``, ``b``, ... from the task pack's
``part``: packs built from disjoint samples), ``sampler`` (from the run's placement list), and ``primary`` /
``higher_is_better`` (from the pack's manifest). :func:`wide_scores` pivots one checkpoint and sample set into one
row per placement with each task's primary score and the aggregate ``score`` (mean retention against
all-attention, :func:`placement_search.evaluators.quality.aggregate_retention`) — the table ``placement-search fit``
and ``optimize`` read.

:func:`export_dataset` writes ``<name>-evaluations.csv.gz`` (tidy), ``<name>-final.csv`` (wide, final checkpoint,
sample set ``a``), ``<name>-noise.csv`` (placements scored on two sample sets; only when some were) and ``<name>-dataset.json``
(provenance, counts); :func:`load_dataset` reads the tidy table back. Needs pandas only (no torch).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from placement_search.errors import PlacementSearchError
from placement_search.evaluators.quality import aggregate_retention
from placement_search.files import atomic_open, write_json_atomic

#: Where the shipped dev-supernet dataset lives (relative to the repository root).
SHIPPED_DIR = Path("results/evaluations")
SHIPPED_NAME = "devnet"
_REPO_ROOT = Path(__file__).resolve().parents[1]
_COLUMNS = ["checkpoint", "sample_set", "placement", "sampler", "task", "metric", "value", "primary",
            "higher_is_better", "docs", "seconds", "device", "finished_at", "checkpoint_hash", "settings_hash"]  # fmt: skip


def sample_set_name(part: Sequence[int] | None) -> str:
    """The sample-set label of a pack built with ``part=(k, n)``: ``a`` for k = 0, ``b`` for 1, ... (``a`` if none)."""
    return "abcdefghijklmnopqrstuvwxyz"[int(part[0])] if part else "a"


def _pack_tasks(manifest: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    return {t["name"]: (t["metric"], bool(t["higher_is_better"])) for t in manifest["tasks"]}


def tidy_results(
    db: str | os.PathLike[str], pack_manifest: Mapping[str, Any], samplers: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """One row per checkpoint, sample set, placement, task and metric (columns: module docstring)."""
    path = Path(db)
    if not path.is_file():
        raise PlacementSearchError(f"{path}: no such results database")
    with sqlite3.connect(str(path)) as conn:
        scores = pd.read_sql_query(
            "SELECT s.checkpoint_hash, s.placement, s.task, s.settings_hash, s.metric, s.value, e.docs, e.seconds, "
            "e.device, e.finished_at FROM scores s JOIN evaluations e USING "
            "(checkpoint_hash, placement, task, settings_hash)", conn)  # fmt: skip
        ckpts = dict(conn.execute("SELECT checkpoint_hash, path FROM checkpoints").fetchall())
        settings = {h: json.loads(s) for h, s in conn.execute("SELECT settings_hash, settings FROM settings")}
    tasks = _pack_tasks(pack_manifest)

    def sample_set(h: str) -> str:
        return sample_set_name(settings.get(h, {}).get("pack_part"))

    out = scores.assign(
        checkpoint=scores.checkpoint_hash.map(lambda h: Path(ckpts.get(h, h)).name),
        sample_set=scores.settings_hash.map(sample_set),
        sampler=scores.placement.map(lambda c: (samplers or {}).get(c, "")),
        primary=[tasks.get(t, ("", False))[0] == m for t, m in zip(scores.task, scores.metric, strict=True)],
        higher_is_better=scores.task.map(lambda t: tasks.get(t, ("", False))[1]),
    )
    return out[_COLUMNS].sort_values(["checkpoint", "sample_set", "placement", "task", "metric"], ignore_index=True)


def reference_placement(space_layers: int, mixer: str = "attention") -> str:
    """The compact code of the all-``mixer`` placement (the retention reference): ``A`` repeated per layer."""
    return mixer[0].upper() * space_layers


def wide_scores(long: pd.DataFrame, checkpoint: str = "supernet", sample_set: str = "a") -> pd.DataFrame:
    """Per placement: sampler, aggregate ``score`` (retention against all-attention) and each task's primary score."""
    part = long[(long.checkpoint == checkpoint) & (long.sample_set == sample_set) & long.primary]
    if part.empty:
        raise PlacementSearchError(f"no primary scores for checkpoint {checkpoint!r}, sample set {sample_set!r}")
    table = part.pivot_table(index="placement", columns="task", values="value", aggfunc="first")
    first = part.drop_duplicates("task").set_index("task")
    higher, metrics = first.higher_is_better.to_dict(), first.metric.to_dict()
    n_layers = len(table.index[0])
    ref_code = reference_placement(n_layers)
    if ref_code not in table.index:
        raise PlacementSearchError(f"checkpoint {checkpoint!r}, sample set {sample_set!r}: all-attention "
                                   f"({ref_code[:4]}...) was not evaluated; it is the retention reference")  # fmt: skip
    reference = table.loc[ref_code].to_dict()
    score = [aggregate_retention({t: v for t, v in row.items() if np.isfinite(v)}, reference, higher, metrics)
             for _, row in table.iterrows()]  # fmt: skip
    samplers = part.drop_duplicates("placement").set_index("placement").sampler
    wide = table.reset_index()
    wide.insert(1, "sampler", wide.placement.map(samplers).fillna(""))
    wide.insert(2, "score", score)
    wide.columns.name = None
    return wide


def export_dataset(
    db: str | os.PathLike[str],
    pack_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = SHIPPED_DIR,
    *,
    name: str = SHIPPED_NAME,
    placements_csv: str | os.PathLike[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
    final_checkpoint: str = "supernet",
) -> dict[str, Path]:
    """Write the tidy, final, noise tables and the provenance JSON (module docstring); returns their paths.

    ``final_checkpoint``: the directory name of the checkpoint the wide and noise tables describe."""
    from placement_search.evaluators.tasks import load_pack_manifest

    manifest = load_pack_manifest(pack_dir)
    samplers = {}
    if placements_csv is not None:
        listing = pd.read_csv(placements_csv, dtype={"placement": str, "sampler": str})
        samplers = dict(zip(listing.placement, listing.sampler, strict=True))
    long = tidy_results(db, manifest, samplers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"evaluations": out / f"{name}-evaluations.csv.gz", "final": out / f"{name}-final.csv",
             "noise": out / f"{name}-noise.csv", "provenance": out / f"{name}-dataset.json"}  # fmt: skip
    with atomic_open(paths["evaluations"], "wb") as f:
        long.to_csv(f, index=False, compression={"method": "gzip", "mtime": 0})
    final = wide_scores(long, final_checkpoint)
    with atomic_open(paths["final"], "w") as f:
        final.to_csv(f, index=False, float_format="%.8g")
    noise = _noise_table(long, final_checkpoint)
    if noise.empty:  # no placement scored on a second sample set: no noise table
        paths.pop("noise").unlink(missing_ok=True)  # a stale one from an earlier export
    else:
        with atomic_open(paths["noise"], "w") as f:
            noise.to_csv(f, index=False, float_format="%.8g")
    counts = (long.drop_duplicates(["checkpoint", "sample_set", "placement"])
              .groupby(["checkpoint", "sample_set"]).size())  # fmt: skip
    write_json_atomic(paths["provenance"], {
        **(provenance or {}),
        "pack": {"settings": manifest.get("settings"), "tasks": manifest["tasks"]},
        "placements": {f"{c}/{s}": int(n) for (c, s), n in counts.items()},
        "noise": _noise_summary(noise),
        "files": {k: p.name for k, p in paths.items() if k != "provenance"},
    })  # fmt: skip
    return paths


def _noise_table(long: pd.DataFrame, checkpoint: str) -> pd.DataFrame:
    """Placements of ``checkpoint`` scored on sample sets ``a`` and ``b``: both aggregate scores."""
    if "b" not in set(long.sample_set[long.checkpoint == checkpoint]):
        return pd.DataFrame(columns=["placement", "score_a", "score_b"])
    a, b = wide_scores(long, checkpoint, "a"), wide_scores(long, checkpoint, "b")
    both = a[["placement", "score"]].merge(b[["placement", "score"]], on="placement", suffixes=("_a", "_b"))
    return both


def _noise_summary(noise: pd.DataFrame) -> dict[str, Any]:
    if noise.empty:
        return {"placements": 0}
    diff = (noise.score_a - noise.score_b).to_numpy(dtype=float)
    return {"placements": len(noise), "score_diff_sd": float(np.std(diff, ddof=1)) if len(diff) > 1 else None,
            "score_sd_across_placements": float(noise.score_a.std(ddof=1)) if len(noise) > 1 else None}  # fmt: skip


def load_dataset(path: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """The tidy table (default: the shipped ``results/evaluations/devnet-evaluations.csv.gz``)."""
    p = Path(path) if path is not None else _REPO_ROOT / SHIPPED_DIR / f"{SHIPPED_NAME}-evaluations.csv.gz"
    if not p.is_file():
        raise PlacementSearchError(f"{p}: no such dataset table")
    frame = pd.read_csv(p, dtype={"placement": str, "sampler": str, "checkpoint": str, "sample_set": str})
    missing = [c for c in _COLUMNS if c not in frame.columns]
    if missing:
        raise PlacementSearchError(f"{p}: not a dataset table (missing column {missing[0]!r})")
    frame["sampler"] = frame["sampler"].fillna("")
    return frame
