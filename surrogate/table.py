"""Reading an evaluation table: placements, their measured quality, and how they were sampled.

Columns: ``placement`` (compact letter code such as ``AAGK...`` or comma-separated mixer names),
the target (``score`` unless told otherwise), optionally ``sampler`` (``uniform``, ``stratified``,
``structured``... — used for out-of-distribution splits) and a speed column (e.g. from a cost
model — used for speed buckets). CSV always; Parquet when ``pyarrow`` is installed.

Every problem is a one-line :class:`~placement_search.errors.PlacementSearchError` naming the file,
and for cell problems the row (counted from 1, header excluded) and the offending value.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from placement_search.errors import InputFileError, PlacementSearchError
from placement_search.placement import Placement, SearchSpace

if TYPE_CHECKING:
    from placement_search.spec import ModelSpec


class TableError(PlacementSearchError):
    """An evaluation table with a missing column or a bad cell."""


@dataclass
class EvaluationTable:
    """A parsed evaluation table."""

    placements: list[Placement]
    y: np.ndarray
    groups: np.ndarray | None
    speed: np.ndarray | None
    frame: pd.DataFrame
    source: str
    target: str
    sha256: str | None = None

    def __len__(self) -> int:
        return len(self.placements)


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV (every cell as text) or Parquet file into a DataFrame."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise InputFileError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
            return pd.read_parquet(p)
        sep = "\t" if suffix in (".tsv", ".tab") else ","
        return pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except InputFileError:
        raise
    except pd.errors.EmptyDataError:
        raise InputFileError(f"{p}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputFileError(f"{p}: cannot read table ({first})") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _numeric(frame: pd.DataFrame, column: str, source: str, what: str) -> np.ndarray:
    values = frame[column]
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        r = int(bad[0])
        raw = values.iloc[r]
        detail = "is empty" if (raw is None or (isinstance(raw, str) and not raw.strip())) else f"{raw!r} is not a number"
        raise TableError(f"{source}: row {r + 1}: {what} column {column!r}: {detail}")
    return numbers


def load_evaluation_table(
    table: str | os.PathLike[str] | pd.DataFrame,
    space: SearchSpace,
    *,
    target: str = "score",
    placement_column: str = "placement",
    sampler_column: str | None = "sampler",
    speed_column: str | None = None,
    source: str | None = None,
) -> EvaluationTable:
    """Parse placements against ``space`` and check the target (and optional speed) are numbers.

    ``sampler_column`` is optional (ignored when absent); ``speed_column``, when given, must exist.
    ``source`` names a DataFrame's origin in error messages (a path names itself).
    """
    if isinstance(table, pd.DataFrame):
        frame, source, sha = table.reset_index(drop=True), source or "<table>", None
    else:
        frame, source, sha = read_table(table), str(table), file_sha256(table)
    columns = [str(c) for c in frame.columns]
    for column in [placement_column, target] + ([speed_column] if speed_column else []):
        if column not in frame.columns:
            raise TableError(f"{source}: no column {column!r}; columns are {', '.join(columns) or '(none)'}")
    if len(frame) == 0:
        raise TableError(f"{source}: no rows")
    placements = []
    for r, value in enumerate(frame[placement_column].tolist()):
        if not isinstance(value, str) or not value.strip():
            raise TableError(f"{source}: row {r + 1}: column {placement_column!r} is empty")
        try:
            placements.append(Placement.from_string(value, space))
        except PlacementSearchError as e:
            raise TableError(f"{source}: row {r + 1}: {e}") from None
    y = _numeric(frame, target, source, "target")
    speed = _numeric(frame, speed_column, source, "speed") if speed_column else None
    groups = None
    if sampler_column and sampler_column in frame.columns:
        groups = frame[sampler_column].astype(str).str.strip().to_numpy(dtype=object)
    return EvaluationTable(placements, y, groups, speed, frame, source, target, sha)



# -- speed from a cost table ----------------------------------------------------------------------


@dataclass
class CostSpeed:
    """Predicted decode throughput (tokens/s) of each placement, and how it was obtained."""

    speed: np.ndarray
    table: str
    context: int
    batch_policy: str
    memory_gib: float | None

    def describe(self) -> str:
        budget = "" if self.memory_gib is None else f", {self.memory_gib:g} GiB"
        return (
            f"predicted decode tokens/s from cost table {Path(self.table).name} "
            f"(context {self.context}, {self.batch_policy}{budget})"
        )


def cost_table_speed(
    placements: list[Placement],
    table_path: str | os.PathLike[str],
    *,
    spec: ModelSpec,
    context: int = 32768,
    batch_policy: str = "max_fit",
    memory_gib: float | None = None,
) -> CostSpeed:
    """Each placement's decode throughput predicted by a cost table (:mod:`placement_search.evaluators.cost_model`).

    ``spec`` is the :class:`~placement_search.spec.ModelSpec` the placements belong to (checked
    against the table). Placements with the same code are predicted once. Any placement the table
    cannot answer for (context outside its grid, a batch that does not fit) is a one-line error.
    """
    from placement_search.evaluators.cost_model import CostTable
    from placement_search.presets import BatchPolicy

    try:
        policy = BatchPolicy.parse(batch_policy)
        table = CostTable.load(table_path)
        table.check_spec(spec)
    except PlacementSearchError as e:
        raise TableError(f"--cost-table {table_path}: {e}") from None
    cache: dict[str, float] = {}
    speed = np.empty(len(placements))
    for i, p in enumerate(placements):
        code = p.code()
        if code not in cache:
            try:
                pred = table.predict(p, int(context), policy, memory_gib, spec=spec, speedup=False)
            except PlacementSearchError as e:
                raise TableError(f"cost table {table_path}: placement {i + 1} ({code}): {e}") from None
            cache[code] = pred.tokens_per_s
        speed[i] = cache[code]
    return CostSpeed(speed, str(table_path), int(context), str(policy), memory_gib)
