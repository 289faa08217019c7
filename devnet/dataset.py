"""The dev supernet's quality dataset: task packs, placements, campaigns at the final and intermediate checkpoints,
evaluation noise and the evaluation speed, in one resumable run (one GPU call; ``bash devnet/gpu.sh dataset``).

1. **Packs** (:func:`build_packs`): ``tasks-a/`` and ``tasks-b/`` from the shipped corpus, drawn from disjoint
   halves of the held-out files and synthetic blocks (``part=(0, 2)`` and ``(1, 2)``), each with teacher traces
   generated greedily by the final supernet's all-attention placement after prompts from its own half. Pack A
   scores every placement; pack B re-scores a subset with other samples, which measures the evaluation noise.
2. **Placements** (:func:`dataset_placements`): the structured families (all-X, periodic, first/last-k), stratified
   over mixer counts and uniform, deduplicated and interleaved, so that every prefix of the list mixes the three;
   all-attention (the retention reference of every score) first, and in the noise and shared sets.
3. **Campaigns** (:func:`build_dataset`), all into one SQLite database (:mod:`placement_search.evaluators.campaign`,
   keyed by checkpoint hash, placement, task and settings; a rerun skips what is stored): the final checkpoint on
   pack A (every placement), then pack B (``noise`` placements spread over the list), then the intermediate
   snapshots on pack A (the first ``shared`` placements, round-robin in chunks so that a deadline leaves every
   snapshot with the same shared prefix).
4. **Speed**: placements per second with the tokens fed and scored per placement, written to ``speed.json``.

Every stage stops starting new placements at ``budget_s`` seconds after the run began.
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from placement_search.devnet.corpus import CORPUS_FILE, Corpus
from placement_search.devnet.snapshots import is_snapshot, materialize_snapshot
from placement_search.errors import PlacementSearchError
from placement_search.evaluators.campaign import Campaign, sample_placements
from placement_search.evaluators.checkpoint import load_supernet
from placement_search.evaluators.tasks import build_task_pack, build_teacher_traces
from placement_search.evaluators.tokenizer import load_tokenizer
from placement_search.files import atomic_open, load_json, write_json_atomic
from placement_search.placement import Placement, SearchSpace

#: The shipped pack settings (per pack; the two packs are disjoint halves of the held-out data).
PACK_SETTINGS: dict[str, Any] = {
    "bpb_docs": 144, "kv_blocks": 64, "kv_queries_per_bin": None, "kv_multiple_choice": False, "mc_docs": 100, "seed": 0,
}
TRACE_SETTINGS: dict[str, Any] = {"prompts": 48, "prompt_tokens": 64, "new_tokens": 64, "seed": 0}
#: The placement list of a run (order, code, sampler, membership of the noise and shared sets), beside the database.
PLACEMENTS_FILE = "placements.csv"
#: The shipped placement mix (structured: the whole family, a few hundred).
PLACEMENT_SPEC = "structured:400,stratified:700,uniform:700"
#: The campaigns of :func:`build_dataset`, in their default order.
STAGES = ("final", "noise", "snapshots")


def build_packs(
    devnet_dir: str | Path, supernet: str | Path, out: str | Path, device: str = "cpu", batch_size: int = 48
) -> dict[str, Path]:
    """Build ``out/tasks-a`` and ``out/tasks-b`` (see the module docstring); returns their paths."""
    devnet_dir, out = Path(devnet_dir), Path(out)
    corpus = Corpus.load(devnet_dir / CORPUS_FILE)
    tokenizer = load_tokenizer(supernet)
    model = load_supernet(supernet, device=device, dtype=torch.float32 if device == "cpu" else None)
    window = int(model.spec.layers[0].mixers["sliding_window"].window_size)
    packs = {}
    for k, name in enumerate(("tasks-a", "tasks-b")):
        path = out / name
        build_task_pack(corpus, tokenizer, path, window=window, part=(k, 2), **PACK_SETTINGS)
        build_teacher_traces(model, tokenizer, corpus, path, part=(k, 2), batch_size=batch_size, **TRACE_SETTINGS)
        packs[name] = path
    del model
    return packs


def _round_robin(lists: Sequence[Sequence[Placement]]) -> list[Placement]:
    out: list[Placement] = []
    for k in range(max((len(x) for x in lists), default=0)):
        out.extend(x[k] for x in lists if k < len(x))
    return list(dict.fromkeys(out))


def dataset_placements(
    space: SearchSpace, spec: str = PLACEMENT_SPEC, seed: int = 0, samplers: dict[Placement, str] | None = None
) -> list[Placement]:
    """The samplers of ``spec`` (deduplicated across them), interleaved one from each in turn; ``samplers``, when
    given, receives each placement's sampler name."""
    parts: list[list[Placement]] = []
    seen: list[Placement] = []
    for k, item in enumerate(x.strip() for x in spec.split(",") if x.strip()):
        got = sample_placements(space, item, seed + k, exclude=seen)
        parts.append(got)
        seen.extend(got)
        if samplers is not None:
            samplers.update(dict.fromkeys(got, item.partition(":")[0]))
    return _round_robin(parts)


def spread(items: Sequence[Placement], count: int) -> list[Placement]:
    """``count`` items evenly spaced over ``items`` (all when fewer)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(k * step)] for k in range(count)]


def build_dataset(
    supernet: str | Path,
    snapshots: Sequence[str | Path],
    packs: dict[str, Path],
    db: str | Path,
    *,
    device: str = "cuda",
    batch_size: int = 128,
    budget_s: float = 450.0,
    noise: int = 40,
    shared: int = 320,
    chunk: int = 40,
    placement_spec: str = PLACEMENT_SPEC,
    final_limit: int | None = None,
    stages: Sequence[str] = STAGES,
    scratch: str | Path | None = None,
    progress: bool = True,
    order_window: int = 256,
) -> dict[str, Any]:
    """Run the campaigns (module docstring) and return the speed and counts record.

    ``final_limit``: plan only the first ``final_limit`` placements of the list (the noise and shared sets are drawn
    from them): a second training run's final checkpoint and snapshots scored on a shared prefix, say.
    ``stages``: which of ``final`` (pack A at the final checkpoint), ``noise`` (pack B on the noise set) and
    ``snapshots`` (pack A at each snapshot on the shared set) run, in this order (``("noise", "final")`` secures the
    noise set before a resumed final campaign takes the rest of the budget).
    ``order_window``: see :meth:`Campaign.run` (code order inside windows: neighbours share leading layers).
    """
    check_stages(stages)
    t_start = time.perf_counter()

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    final = Campaign(supernet, packs["tasks-a"], db, device=device, batch_size=batch_size)
    space = final.model.spec.search_space
    samplers: dict[Placement, str] = {}
    placements = dataset_placements(space, placement_spec, samplers=samplers)
    # all-attention, the retention reference of every score, comes first: in every set, whatever the deadline
    ref = Placement(["attention"] * space.num_layers, space)
    samplers.setdefault(ref, "structured")
    placements = [ref, *(p for p in placements if p != ref)][:final_limit]
    noise_set = [ref, *spread(placements[1:], noise - 1)] if noise > 0 else []
    shared_set = placements[:shared]
    in_noise = set(noise_set)
    rows = [{"order": i, "placement": p.code(), "sampler": samplers[p], "noise_set": p in in_noise,
             "shared_set": i < shared} for i, p in enumerate(placements)]  # fmt: skip
    with atomic_open(Path(db).parent / PLACEMENTS_FILE, "w") as f:
        pd.DataFrame(rows).to_csv(f, index=False)
    record: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "batch_size": batch_size,
        "order_window": order_window,
        "placements_planned": len(placements),
        "fed_tokens_per_placement": final.built.plan.num_tokens,
        "scored_tokens_per_placement": final.built.plan.scored_tokens,
        "stages": [],
    }

    def stage(name: str, campaign: Campaign, todo: Sequence[Placement]) -> None:
        summary = campaign.run(todo, progress=progress, max_seconds=max(0.0, left()), desc=name,
                               order_window=order_window)  # fmt: skip
        record["stages"].append({
            "stage": name, "checkpoint_hash": summary.checkpoint_hash, "evaluated": summary.evaluated,
            "skipped": summary.skipped, "left": summary.left, "seconds": round(summary.seconds, 2),
            "placements_per_second": round(summary.placements_per_second, 3) if summary.evaluated else None,
            "cuda_graphs": campaign.graph_check,
        })  # fmt: skip
        print(f"{name}: {summary.evaluated} evaluated, {summary.skipped} done before, {summary.left} left, "
              f"{summary.seconds:.1f} s", flush=True)  # fmt: skip

    def run_noise() -> None:
        other = Campaign(supernet, packs["tasks-b"], db, device=device, batch_size=batch_size)
        stage("final/tasks-b", other, noise_set)

    def run_snapshots() -> None:
        tmp = Path(scratch or Path(db).parent / "snapshot-checkpoints")
        full = {}
        for snap in snapshots:
            snap = Path(snap)
            if not is_snapshot(snap):
                raise FileNotFoundError(f"{snap}: not a snapshot directory")
            full[snap.name] = tmp / snap.name
            if not (full[snap.name] / "config.json").is_file():
                materialize_snapshot(snap, supernet, full[snap.name])
        for start in range(0, len(shared_set), chunk):
            for name, path in full.items():
                if left() <= 0:
                    break
                final.use_checkpoint(path)
                stage(f"{name}/tasks-a", final, shared_set[start : start + chunk])
        final.use_checkpoint(supernet)
        shutil.rmtree(tmp, ignore_errors=True)

    for i, name in enumerate(stages):
        if i and left() <= 0:
            break
        if name == "final":
            stage("final/tasks-a", final, placements)
        elif name == "noise" and noise_set:
            run_noise()
        elif name == "snapshots" and snapshots:
            run_snapshots()
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    done = [s for s in record["stages"] if s["evaluated"]]
    total = sum(s["evaluated"] for s in done)
    record["placements_per_second"] = round(total / sum(s["seconds"] for s in done), 3) if done else None
    return record


def check_stages(stages: Sequence[str]) -> None:
    """Raise a one-line error unless ``stages`` is a non-empty list of :data:`STAGES` names."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise PlacementSearchError(f"--stages must name some of {', '.join(STAGES)}, got {', '.join(stages) or '(none)'}")


def main(args: Any) -> int:
    """``python -m placement_search.devnet dataset`` (see ``devnet/__main__.py``)."""
    stages = tuple(s for s in args.stages.split(",") if s)
    check_stages(stages)  # before the packs are built
    out = Path(args.work)
    supernet = Path(args.supernet)
    snapshots = sorted(p for p in Path(args.snapshots).glob("supernet-step*") if is_snapshot(p)) if args.snapshots else []
    backends = None
    if str(args.device).startswith("cuda"):
        # the kernel paths the training preflight checked (GDN through fla's KDA kernels by default: one kernel
        # family, autotuned once); sliding windows run as dense-mask SDPA here (kernels.attention: no compilation)
        from placement_search.devnet.preflight import apply_backends

        pre = Path(args.devnet) / "preflight.json"
        backends = apply_backends(load_json(pre)["backends"] if pre.is_file() else {"gdn": "fla_kda"})
    t0 = time.perf_counter()
    have = all((out / n / "pack.json").is_file() for n in ("tasks-a", "tasks-b"))
    packs = {n: out / n for n in ("tasks-a", "tasks-b")} if have else build_packs(args.devnet, supernet, out, args.device)
    pack_s = time.perf_counter() - t0
    print(f"packs ready in {pack_s:.1f} s: {', '.join(str(p) for p in packs.values())}", flush=True)
    record = build_dataset(supernet, snapshots, packs, out / "devnet.sqlite", device=args.device,
                           batch_size=args.batch_size, budget_s=args.budget - pack_s, noise=args.noise,
                           shared=args.shared, placement_spec=args.placements or PLACEMENT_SPEC,
                           final_limit=args.final_limit, stages=stages, order_window=args.order_window,
                           progress=not args.quiet)  # fmt: skip
    record["pack_build_seconds"] = round(pack_s, 1)
    record["kernel_paths"] = backends
    record["snapshots"] = [p.name for p in snapshots]
    record["supernet_config"] = load_json(supernet / "config.json").get("name", str(supernet))
    record["placement_spec"] = args.placements or PLACEMENT_SPEC
    record["final_checkpoint"] = supernet.name
    if (out / "speed.json").is_file():  # a resumed run: the earlier runs' records stay (provenance of every row)
        before = load_json(out / "speed.json")
        record["earlier_runs"] = [*before.pop("earlier_runs", []), before]
    write_json_atomic(out / "speed.json", record)
    print(f"{record['placements_per_second']} placements/s; {record['scored_tokens_per_placement']} scored and "
          f"{record['fed_tokens_per_placement']} fed tokens per placement -> {out / 'speed.json'}", flush=True)  # fmt: skip
    return 0


def export(work: str | Path, out: str | Path, *, name: str = "devnet") -> int:
    """``python -m placement_search.devnet dataset-export``: the shipped tables of a dataset run (see
    :func:`placement_search.evaluators.dataset.export_dataset`), with the run's speed record as provenance."""
    from placement_search.evaluators.dataset import export_dataset

    work = Path(work)
    speed = load_json(work / "speed.json") if (work / "speed.json").is_file() else None
    listing = work / PLACEMENTS_FILE
    paths = export_dataset(work / "devnet.sqlite", work / "tasks-a", out, name=name,
                           placements_csv=listing if listing.is_file() else None,
                           provenance={"run": speed, "pack_settings": PACK_SETTINGS,
                                       "trace_settings": TRACE_SETTINGS},
                           final_checkpoint=(speed or {}).get("final_checkpoint", "supernet"))  # fmt: skip
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def stability_report(run: str | Path, shipped: str | Path, out: str | Path, *, final: str = "supernet") -> int:
    """``python -m placement_search.devnet stability``: how the ranking of placements at each intermediate checkpoint
    of a run (and at the shipped final) agrees with the run's final ranking, and with the shipped final's; writes
    ``OUT.json`` and ``OUT.md`` (see :mod:`placement_search.evaluators.stability`)."""
    from placement_search.evaluators.dataset import load_dataset
    from placement_search.evaluators.stability import checkpoint_tables, ranking_stability
    from placement_search.files import write_text_atomic

    tables = checkpoint_tables(load_dataset(run))
    if final not in tables:
        raise PlacementSearchError(f"{run}: no final checkpoint ({final!r}) in this table")
    shipped_table = pd.read_csv(shipped, dtype={"placement": str})
    tables["shipped final"] = shipped_table
    vs_run = ranking_stability(tables, final)
    vs_shipped = ranking_stability(tables, "shipped final")
    command = f"python -m placement_search.devnet stability --run {run} --shipped {shipped} --out {out}"
    record = {
        "what": "ranking stability of the placements' aggregate scores (retention against all-attention)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "run": str(run),
        "shipped": str(shipped),
        "against_run_final": vs_run.to_dict(orient="records"),
        "against_shipped_final": vs_shipped.to_dict(orient="records"),
    }
    write_json_atomic(f"{out}.json", record)
    lines = ["# Ranking stability across checkpoints", "",
             f"From `{run}` (a run's final and intermediate checkpoints on shared placements) and `{shipped}`.",
             f"Made by `{command}`.", ""]  # fmt: skip
    for title, frame in (("Against the run's final checkpoint", vs_run), ("Against the shipped final", vs_shipped)):
        lines += [f"## {title}", "", "| checkpoint | placements | Spearman | Kendall | top-10% overlap | mean abs diff |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r.checkpoint} | {r.placements} | {r.spearman:.3f} | {r.kendall:.3f} | {r.top10_overlap:.2f} | "
                  f"{r.mean_abs_diff:.4f} |" for r in frame.itertuples()]  # fmt: skip
        lines.append("")
    write_text_atomic(f"{out}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


def recheck_report(work: str | Path, reference: str | Path, out: str | Path) -> int:
    """``python -m placement_search.devnet recheck``: a dataset run into an empty database (``gpu.sh recheck``)
    against the shipped table: every metric value compared (:func:`~placement_search.evaluators.reproduction.
    score_reproduction`) beside the run's speed record; writes ``out`` (JSON). Exit status 1 unless every value
    is bitwise equal."""
    from placement_search.evaluators.dataset import load_dataset, tidy_results
    from placement_search.evaluators.reproduction import score_reproduction

    work = Path(work)
    if not (work / "tasks-a" / "pack.json").is_file():
        raise PlacementSearchError(f"{work}: no tasks-a/pack.json (copy the run's packs beside its database)")
    new = tidy_results(work / "devnet.sqlite", load_json(work / "tasks-a" / "pack.json"))
    result = score_reproduction(new, load_dataset(reference))
    speed = load_json(work / "speed.json") if (work / "speed.json").is_file() else None
    record = {
        "what": "placements scored again into an empty database, compared with the shipped table",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python -m placement_search.devnet recheck --work {work} --reference {reference} --out {out}",
        "reference": str(reference),
        "comparison": result,
        "run": speed,
    }
    write_json_atomic(out, record)
    rate = (speed or {}).get("placements_per_second")
    print(f"{result['bitwise_equal']} of {result['values']} values ({result['placements']} placements) bitwise "
          f"equal, max rel diff {result['max_rel_diff']:.3g}, {result['unmatched']} without a reference row; "
          f"{rate} placements/s -> {out}")  # fmt: skip
    return 0 if result["bitwise_equal"] == result["values"] else 1
