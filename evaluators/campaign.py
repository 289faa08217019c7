"""Evaluation campaigns: many placements of one checkpoint on one device, results in SQLite as they finish.

- Tasks are lm-eval tasks (the ``ps_*`` pack or any task lm-eval can load); their requests are built once with
  lm-eval's own task code, encoded once (:class:`~placement_search.evaluators.lm_eval_model.RequestEncoder`), pooled
  across tasks, deduplicated and planned once (:class:`~placement_search.evaluators.lm_eval_model.ScoringPlan`:
  prefix sharing, one context pass for requests sharing a context such as multiple choice, batching). Per
  placement the model switches mixers (no reload), runs the plan, and lm-eval's
  filters, ``process_results`` and aggregations turn the responses into the metrics ``simple_evaluate`` would report
  through :class:`~placement_search.evaluators.lm_eval_model.PlacementSearchLM`.
- Results: table ``scores`` (one row per metric) and ``evaluations`` (one row per placement and task) keyed by
  ``(checkpoint_hash, placement, task, settings_hash)``; ``placement`` is the compact letter code. The database runs
  in WAL mode and each placement is written in one transaction, so an interruption loses at most the placement in
  progress and never leaves it half-written. A rerun skips every key already present.
- :func:`load_results` returns a tidy DataFrame (one row per placement, task and metric).

``generate_until`` tasks are not supported in campaigns (run them through lm-eval with the model class).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from placement_search.errors import PlacementSearchError
from placement_search.evaluators.lm_eval_model import (
    RequestEncoder,
    ScoringPlan,
    TokenRequest,
    parse_dtype,
)
from placement_search.placement import Placement, SearchSpace
from placement_search.sampling import SAMPLERS, sample

#: Bumped whenever the scoring conventions change (part of every settings hash).
SCORING_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    checkpoint_hash TEXT NOT NULL, placement TEXT NOT NULL, task TEXT NOT NULL, settings_hash TEXT NOT NULL,
    docs INTEGER NOT NULL, seconds REAL NOT NULL, device TEXT NOT NULL, finished_at TEXT NOT NULL,
    PRIMARY KEY (checkpoint_hash, placement, task, settings_hash));
CREATE TABLE IF NOT EXISTS scores (
    checkpoint_hash TEXT NOT NULL, placement TEXT NOT NULL, task TEXT NOT NULL, settings_hash TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (checkpoint_hash, placement, task, settings_hash, metric));
CREATE TABLE IF NOT EXISTS settings (settings_hash TEXT PRIMARY KEY, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (checkpoint_hash TEXT PRIMARY KEY, path TEXT NOT NULL);
"""


# --------------------------------------------------------------------------------------------
# Keys


def checkpoint_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint's content: its config (``config.json`` parsed, as canonical JSON) and every tensor of
    its ``*.safetensors`` files in name order (name, dtype, shape and raw bytes, read from the safetensors header's
    offsets). Re-sharding or re-saving the same weights keeps the key (files differing only in their layout or
    header metadata hash alike); any change of a weight or of the config changes it."""
    p = Path(path)
    config = p / "config.json"
    if not config.is_file():
        raise PlacementSearchError(f"{p}: not a checkpoint (no config.json)")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlacementSearchError(f"{config}: unreadable config ({e})") from None
    tensors: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for f in sorted(p.glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = fh.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(fh.read(size)) if 0 < size < (1 << 27) else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
        if not isinstance(header, dict):
            raise PlacementSearchError(f"{f}: not a safetensors file (bad header)")
        for name, info in header.items():
            if name != "__metadata__":
                if name in tensors:
                    raise PlacementSearchError(f"{f}: tensor {name!r} is also in {tensors[name][0].name}")
                tensors[name] = (f, 8 + size, info)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode() + b"\0")
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(open(f, "rb")) for f in {f for f, _, _ in tensors.values()}}
        for name in sorted(tensors):
            f, base, info = tensors[name]
            start, end = info["data_offsets"]
            h.update(json.dumps([name, info["dtype"], info["shape"]]).encode() + b"\0")
            fh = handles[f]
            fh.seek(base + start)
            left = end - start
            while left > 0:
                chunk = fh.read(min(left, 1 << 22))
                if not chunk:
                    raise PlacementSearchError(f"{f}: tensor {name!r} is truncated")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def _json_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Tasks


def resolve_tasks(spec: str | os.PathLike[str]) -> tuple[str | None, list[str]]:
    """``(include_path, task names)`` from a task pack directory (all its tasks) or comma-separated names."""
    text = str(spec)
    if os.path.isdir(text):
        from placement_search.evaluators.tasks import load_pack_manifest

        yamls = sorted(Path(text).glob("*.yaml"))
        if not yamls:
            raise PlacementSearchError(f"{text}: no task YAML files in this directory")
        names = [t["name"] for t in load_pack_manifest(text)["tasks"]]
        return text, names
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise PlacementSearchError("no tasks given")
    return None, names


def load_lm_eval_tasks(spec: str | os.PathLike[str]) -> dict[str, Any]:
    """lm-eval task objects by name (offline for the local pack); one-line errors for unknown tasks."""
    from lm_eval.tasks import TaskManager

    include, names = resolve_tasks(spec)
    with tempfile.TemporaryDirectory(prefix="ps-pack-") as tmp:
        if include is not None:  # a pack: its YAMLs point at the pack's own data wherever the pack now lives
            from placement_search.evaluators.tasks import write_relocated_yamls

            write_relocated_yamls(include, tmp)
        manager = TaskManager(include_path=tmp if include else None, include_defaults=include is None)
        known = set(manager.all_tasks)
        missing = [n for n in names if n not in known]
        if missing:
            raise PlacementSearchError(f"unknown task {missing[0]!r}" + (f" in {include}" if include else ""))
        try:
            return dict(manager.load(names)["tasks"])
        except Exception as e:  # datasets / lm-eval raise many types for missing data
            raise PlacementSearchError(f"cannot load tasks {', '.join(names)}: {type(e).__name__}: {e}") from None


@dataclass
class _TaskPlan:
    task: Any
    units: list[list[int]]  # per instance: indices into the shared request pool
    reduce: list[str]  # per instance: "pair" (loglikelihood) or "sum" (rolling)
    settings_hash: str = ""


@dataclass
class CampaignTasks:
    """Tasks with their requests built and encoded once, pooled into one :class:`ScoringPlan`."""

    tasks: dict[str, _TaskPlan]
    requests: list[TokenRequest]
    plan: ScoringPlan
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        task_objects: dict[str, Any],
        encoder: RequestEncoder,
        batch_size: int,
        extra_settings: dict[str, Any],
        share_contexts: bool = True,
    ) -> CampaignTasks:
        """Build every task's requests (lm-eval), encode and pool them, and plan the scoring
        (``share_contexts``: see :class:`~placement_search.evaluators.lm_eval_model.ScoringPlan`)."""
        pool: dict[TokenRequest, int] = {}
        plans: dict[str, _TaskPlan] = {}
        settings: dict[str, dict[str, Any]] = {}

        def add(req: TokenRequest) -> int:
            return pool.setdefault(req, len(pool))

        for name, task in task_objects.items():
            task.build_all_requests(limit=None, rank=0, world_size=1)
            units: list[list[int]] = []
            reduce: list[str] = []
            content = hashlib.sha256()
            for inst in task.instances:
                content.update(json.dumps([inst.request_type, list(inst.args)], default=str).encode())
                if inst.request_type == "loglikelihood":
                    units.append([add(encoder.loglikelihood(*inst.args))])
                    reduce.append("pair")
                elif inst.request_type == "loglikelihood_rolling":
                    units.append([add(r) for r in encoder.rolling(inst.args[0])])
                    reduce.append("sum")
                else:
                    raise PlacementSearchError(
                        f"task {name}: {inst.request_type} requests are not supported in campaigns (use lm-eval)"
                    )
            s = {"task": name, "requests_sha256": content.hexdigest(), "scoring_version": SCORING_VERSION,
                 "max_length": encoder.max_length, **extra_settings}  # fmt: skip
            settings[name] = s
            plans[name] = _TaskPlan(task, units, reduce, _json_hash(s))
        requests = list(pool)
        return cls(plans, requests, ScoringPlan(requests, encoder.max_length, batch_size, share_contexts), settings)

    def score(self, model: Any, forward: Callable[[Any], Any] | None = None) -> dict[str, tuple[dict[str, float], int]]:
        """Per task: (``{"metric,filter": value}``, documents) under ``model``'s current placement (``forward``:
        see :meth:`ScoringPlan.run <placement_search.evaluators.lm_eval_model.ScoringPlan.run>`)."""
        return self.metrics(self.plan.run(model, forward))

    def metrics(self, results: Sequence[tuple[float, bool]]) -> dict[str, tuple[dict[str, float], int]]:
        """Per task metrics from the scored requests (``ScoringPlan.run``'s list)."""
        return {name: _task_metrics(tp, results) for name, tp in self.tasks.items()}


def _task_metrics(tp: _TaskPlan, results: Sequence[tuple[float, bool]]) -> tuple[dict[str, float], int]:
    """lm-eval's post-processing for one task: responses -> filters -> ``process_results`` -> aggregations."""
    task = tp.task
    for inst, units, how in zip(task.instances, tp.units, tp.reduce, strict=True):
        inst.resps = [results[units[0]] if how == "pair" else math.fsum(results[u][0] for u in units)]
        inst.filtered_resps = {}
    task.apply_filters()
    by_doc: dict[int, list[Any]] = defaultdict(list)
    for inst in task.instances:
        by_doc[inst.doc_id].append(inst)
    raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for key in task.instances[0].filtered_resps:
        for doc_id in sorted(by_doc):
            insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
            for metric, value in task.process_results(insts[0].doc, [i.filtered_resps[key] for i in insts]).items():
                raw[(metric, key)].append(value)
    aggregations = task.aggregation()
    out: dict[str, float] = {}
    for (metric, key), items in raw.items():
        fn = aggregations.get(metric) or (lambda xs: float(np.mean(xs)))
        out[f"{metric},{key}"] = float(fn(items))
    return out, len(by_doc)


# --------------------------------------------------------------------------------------------
# Placements


def sample_placements(space: SearchSpace, spec: str, seed: int, exclude: Iterable[Placement] = ()) -> list[Placement]:
    """Placements from ``"uniform:200,stratified:200,structured:50"`` (deduplicated across samplers)."""
    seen = list(exclude)
    out: list[Placement] = []
    for k, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        name, _, count = part.partition(":")
        if name not in SAMPLERS or not count.isdigit():
            raise PlacementSearchError(
                f"cannot read sampler {part!r}: write NAME:COUNT with NAME one of {', '.join(SAMPLERS)}"
            )
        got = sample(space, int(count), name, seed=[seed, k], exclude=[*seen, *out])  # type: ignore[arg-type]
        out.extend(got)
    return out


# --------------------------------------------------------------------------------------------
# Storage


def connect(db: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (creating) a results database in WAL mode."""
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db), timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


def done_keys(conn: sqlite3.Connection, ckpt: str) -> set[tuple[str, str, str]]:
    """``(placement, task, settings_hash)`` already evaluated for checkpoint ``ckpt``."""
    rows = conn.execute("SELECT placement, task, settings_hash FROM evaluations WHERE checkpoint_hash = ?", (ckpt,))
    return {tuple(r) for r in rows}  # type: ignore[misc]


def rekey_checkpoint(db: str | os.PathLike[str], old: str, new: str) -> int:
    """Move every result stored under checkpoint hash ``old`` to ``new``: the same weights under another key (a
    checkpoint re-saved before :func:`checkpoint_hash` hashed content, say). Where ``new`` already holds a key the
    row under ``new`` is kept and the one under ``old`` dropped. Returns the number of evaluations moved."""
    if not Path(db).is_file():
        raise PlacementSearchError(f"{db}: no such results database")
    conn = connect(db)
    try:
        with conn:
            moved = conn.execute("UPDATE OR IGNORE evaluations SET checkpoint_hash = ? WHERE checkpoint_hash = ?",
                                 (new, old)).rowcount  # fmt: skip
            for table in ("scores", "checkpoints"):
                conn.execute(f"UPDATE OR IGNORE {table} SET checkpoint_hash = ? WHERE checkpoint_hash = ?", (new, old))
            for table in ("evaluations", "scores", "checkpoints"):
                conn.execute(f"DELETE FROM {table} WHERE checkpoint_hash = ?", (old,))
    finally:
        conn.close()
    return moved


def load_results(db: str | os.PathLike[str]) -> pd.DataFrame:
    """Tidy results: one row per checkpoint, placement, task, settings and metric, with the evaluation's details."""
    if not Path(db).is_file():
        raise PlacementSearchError(f"{db}: no such results database")
    with sqlite3.connect(str(db)) as conn:
        return pd.read_sql_query(
            "SELECT s.checkpoint_hash, s.placement, s.task, s.settings_hash, s.metric, s.value, "
            "e.docs, e.seconds, e.device, e.finished_at FROM scores s JOIN evaluations e USING "
            "(checkpoint_hash, placement, task, settings_hash) ORDER BY e.finished_at, s.placement, s.task, s.metric",
            conn,
        )


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class CampaignSummary:
    """What a run did: placements evaluated now, skipped as done, and left for later; wall seconds; tokens fed to the
    model and tokens scored per placement."""

    evaluated: int
    skipped: int
    seconds: float
    fed_tokens_per_placement: int
    scored_tokens_per_placement: int
    checkpoint_hash: str
    left: int = 0  # placements not started because ``max_seconds`` ran out

    @property
    def placements_per_second(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else math.nan


class Campaign:
    """One checkpoint's model and the built tasks, ready to score placements into a results database.

    Building the tasks (lm-eval requests, encoding, the scoring plan) happens once; :meth:`use_checkpoint` swaps in
    another checkpoint of the same architecture and tokenizer (for example the intermediate snapshots of a training
    run) without rebuilding them. :meth:`run` evaluates placements, skipping keys already stored.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        tasks: str | os.PathLike[str],
        db: str | os.PathLike[str],
        *,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 16,
        max_length: int | None = None,
        share_contexts: bool | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        """``share_contexts`` (default: on CPU only): score requests that share a context from one context pass
        (:class:`~placement_search.evaluators.lm_eval_model.ScoringPlan`); scores agree either way to rounding.
        ``cuda_graphs`` (default: on CUDA): run the plan's batches through
        :class:`~placement_search.evaluators.graphs.GraphedPrefill`, captured on the first placement and checked
        there against the eager forward (``graph_check``); when capture fails or the check does not hold, the
        campaign warns and runs eagerly."""
        from placement_search.evaluators.tokenizer import load_tokenizer

        self.cuda_graphs = str(device).startswith("cuda") if cuda_graphs is None else cuda_graphs
        self.graphs: Any = None
        self.graph_check: dict[str, Any] | None = None
        self.task_spec = str(tasks)
        self.device, self.dtype_name, self.db = device, dtype, Path(db)
        task_objects = load_lm_eval_tasks(tasks)
        self.use_checkpoint(checkpoint)
        tokenizer = load_tokenizer(self.checkpoint_dir)
        self.max_length = max_length or int(self.model.spec.max_position_embeddings)
        self.encoder = RequestEncoder(tokenizer, self.max_length)
        extra: dict[str, Any] = {"dtype": str(self.model.dtype)}
        if os.path.isdir(self.task_spec):  # a pack: its sample part tells packs built from other samples apart
            from placement_search.evaluators.tasks import load_pack_manifest

            part = load_pack_manifest(self.task_spec).get("settings", {}).get("corpus", {}).get("part")
            if part is not None:
                extra["pack_part"] = part
        share = not str(device).startswith("cuda") if share_contexts is None else share_contexts
        self.built = CampaignTasks.build(task_objects, self.encoder, batch_size, extra, share)

    def use_checkpoint(self, checkpoint: str | os.PathLike[str]) -> str:
        """Load ``checkpoint`` (same architecture) for the next :meth:`run` calls; returns its hash."""
        from placement_search.evaluators.checkpoint import load_supernet

        ckpt_dir = Path(checkpoint)
        if not ckpt_dir.is_dir():
            raise PlacementSearchError(f"{ckpt_dir}: no such checkpoint directory")
        dtype = parse_dtype(self.dtype_name, self.device)
        if getattr(self, "graphs", None) is not None:  # the graphs read the captured model's parameters: copy in place
            self.graphs.load_weights(load_supernet(ckpt_dir, device=self.device, dtype=dtype))
        else:
            old = getattr(self, "model", None)
            self.model = None  # free the previous weights first
            del old
            self.model = load_supernet(ckpt_dir, device=self.device, dtype=dtype)
        self.model.eval().requires_grad_(False)
        if hasattr(self, "built") and str(self.model.dtype) != self.built.settings[next(iter(self.built.settings))]["dtype"]:
            raise PlacementSearchError(f"{ckpt_dir}: loads as {self.model.dtype}, the tasks were built for another dtype")
        self.checkpoint_dir = ckpt_dir
        self.checkpoint_hash = checkpoint_hash(ckpt_dir)
        return self.checkpoint_hash

    def run(
        self,
        placements: Sequence[Placement | str | Sequence[str]],
        *,
        progress: bool = True,
        max_seconds: float | None = None,
        on_placement: Callable[[int, Placement], None] | None = None,
        desc: str = "placements",
        order_window: int = 0,
    ) -> CampaignSummary:
        """Evaluate ``placements`` under the current checkpoint, storing each as it finishes.

        ``max_seconds``: start no new placement after this many seconds (the rest stay for a rerun); a positive
        budget always evaluates at least one placement, 0 none.
        ``on_placement(i, placement)`` is called after placement ``i`` is committed (progress hooks, tests).
        ``order_window``: evaluate each run of that many consecutive placements still to do in placement-code order,
        so that neighbours share leading layers, which the CUDA-graphed forward does not recompute (0: as given).

        The next placement is queued on the device before the previous one's scores are read and stored, so the
        device does not wait for the host's bookkeeping; an interruption loses at most those two placements.
        """
        from tqdm import tqdm

        model, built, ckpt = self.model, self.built, self.checkpoint_hash
        space = model.spec.search_space
        chosen = list(dict.fromkeys(Placement.parse(p, space) for p in placements))
        conn = connect(self.db)
        evaluated = 0
        try:
            with conn:
                conn.execute("INSERT OR IGNORE INTO checkpoints VALUES (?, ?)", (ckpt, str(self.checkpoint_dir.resolve())))
                for name, tp in built.tasks.items():
                    conn.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)",
                                 (tp.settings_hash, json.dumps(built.settings[name], sort_keys=True)))  # fmt: skip
            done = done_keys(conn, ckpt)
            todo = [p for p in chosen if any((p.code(), n, tp.settings_hash) not in done for n, tp in built.tasks.items())]
            if order_window > 1:
                todo = [p for k in range(0, len(todo), order_window)
                        for p in sorted(todo[k : k + order_window], key=Placement.code)]  # fmt: skip
            forward = self._graphed(todo[0]) if todo and max_seconds != 0 else None
            start = last_done = time.perf_counter()

            def finish(i: int, p: Placement, launched: Any) -> None:
                nonlocal evaluated, last_done
                scored = built.metrics(built.plan.collect(launched))
                now = time.perf_counter()
                seconds, last_done = now - last_done, now
                stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
                with conn:  # one transaction per placement
                    for name, (metrics, docs) in scored.items():
                        key = (ckpt, p.code(), name, built.tasks[name].settings_hash)
                        if key[1:] in done:
                            continue
                        conn.execute("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                     (*key, docs, seconds, str(model.device), stamp))  # fmt: skip
                        conn.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                                         [(*key, m, v) for m, v in sorted(metrics.items())])  # fmt: skip
                evaluated += 1
                if on_placement is not None:
                    on_placement(i, p)

            pending: tuple[int, Placement, Any] | None = None
            for i, p in enumerate(tqdm(todo, desc=desc, unit="placement", disable=not progress)):
                if max_seconds is not None and (max_seconds <= 0 or (i and time.perf_counter() - start >= max_seconds)):
                    break  # a positive budget always buys the first placement, so repeated runs make progress
                model.set_placement(p)
                launched = built.plan.launch(model, forward)
                if pending is not None:
                    finish(*pending)
                pending = (i, p, launched)
            if pending is not None:
                finish(*pending)
            elapsed = time.perf_counter() - start
        finally:
            conn.close()
        return CampaignSummary(evaluated, len(chosen) - len(todo), elapsed, built.plan.num_tokens,
                               built.plan.scored_tokens, ckpt, len(todo) - evaluated)  # fmt: skip

    def _graphed(self, placement: Placement) -> Any:
        """The CUDA-graphed forward (None when off or unusable here), captured and checked on first use: the first
        placement and one sharing its first half (prefix reuse) are scored eagerly and through the graphs, and the
        graphs are used when every request's log-likelihood agrees within ``GRAPH_RTOL`` (relative) and no greedy
        match flips."""
        if not self.cuda_graphs or self.graph_check is not None:
            return self.graphs

        from placement_search.evaluators.graphs import GraphedPrefill

        plan, model = self.built.plan, self.model
        # the first placement, then one sharing its first half (run second: the graphs start at the changed layer)
        names = list(placement.mixers)
        half = len(names) // 2
        offered = [model.built[i] for i in range(len(names))]
        second = Placement(names[:half] + [o[(o.index(n) + 1) % len(o)] for n, o in zip(names[half:], offered[half:],
                                                                                         strict=True)], placement.space)
        t0 = time.perf_counter()
        try:
            eager, graphed = [], []
            for p in (placement, second):
                model.set_placement(p)
                eager.extend(plan.run(model))
            graphs = GraphedPrefill(model, plan.batch_shapes)
            for p in (placement, second):
                model.set_placement(p)
                graphed.extend(plan.run(model, graphs))
        except Exception as e:  # capture is not possible with some kernel path here: run eagerly
            self.graph_check = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            warnings.warn(f"CUDA graphs off ({self.graph_check['error']}): evaluating eagerly", stacklevel=2)
            return None
        finally:
            model.set_placement(placement)
        rel, flips = score_agreement(eager, graphed)
        ok = rel <= GRAPH_RTOL and flips == 0
        self.graph_check = {"ok": ok, "placements": [placement.code(), second.code()], "requests": len(eager),
                            "layers_skipped": graphs.layers_skipped, "max_rel_diff": rel,
                            "greedy_flips": flips, "graphs": graphs.num_graphs, "shapes": graphs.shapes,
                            "capture_seconds": round(graphs.capture_seconds, 2),
                            "check_seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        if not ok:
            warnings.warn(f"CUDA graphs off: graphed scores differ from eager ({rel:.2e} relative, {flips} greedy "
                          "flips): evaluating eagerly", stacklevel=2)  # fmt: skip
            return None
        self.graphs = graphs
        return graphs


def score_agreement(a: Sequence[tuple[float, bool]], b: Sequence[tuple[float, bool]]) -> tuple[float, int]:
    """Two scorings of the same requests (``ScoringPlan.run``'s lists): the largest relative difference of a
    log-likelihood (relative to ``max(1, |a|)``) and the number of greedy matches that differ."""
    rel = max((abs(x - y) / max(1.0, abs(x)) for (x, _), (y, _) in zip(a, b, strict=True)), default=0.0)
    return rel, sum(x != y for (_, x), (_, y) in zip(a, b, strict=True))


#: Largest relative difference between a request's graphed and eager log-likelihood for the graphs to be used: the
#: two run the same kernels on the same inputs, so anything beyond float rounding means a capture went wrong.
GRAPH_RTOL = 1e-4


def run_campaign(
    checkpoint: str | os.PathLike[str],
    tasks: str | os.PathLike[str],
    placements: Sequence[Placement | str | Sequence[str]],
    db: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    on_placement: Callable[[int, Placement], None] | None = None,
) -> CampaignSummary:
    """Evaluate ``placements`` of ``checkpoint`` on ``tasks`` (pack directory or names), storing each as it finishes
    (see :class:`Campaign`)."""
    campaign = Campaign(checkpoint, tasks, db, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length)
    return campaign.run(placements, progress=progress, max_seconds=max_seconds, on_placement=on_placement)
