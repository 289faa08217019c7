"""The dry run: the whole pipeline at full model size with tiny batches and short sequences, and the GPU plan.

:func:`dry_run` copies the shipped corpus (sequences cut to ``seq_len`` tokens, retrieval queries that no
longer fit dropped) and tokenizer into a scratch directory and runs :func:`.train.run_pipeline` there with the
``full`` model (48 layers, every mixer) but 2 teacher steps, 3 distillation steps (2 snapshots), batches of 2
rows and a small evidence study, on the CPU (or the GPU: then the preflight runs too). It then checks the
snapshots round-trip (overlay == materialised directory == the model that wrote them) and packs both calls'
outputs with :mod:`.transport` under the device's limits, unpacking them again into a fresh directory. Shapes
and dtypes at full width, the stage plumbing, exports, evidence, stability and packing are all exercised.

:func:`gpu_plan` is the plan of the real run (stages, budgets, steps from ``gpu-estimate.json``, the files that
come back per call and their sizes) printed by ``train --dry-run``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from placement_search.devnet.config import EvidenceSettings, Settings, full_settings, model_spec
from placement_search.devnet.corpus import CORPUS_FILE, MANIFEST_FILE, Corpus
from placement_search.devnet.snapshots import (
    load_snapshot,
    materialize_snapshot,
    snapshot_from_checkpoint,
)
from placement_search.devnet.tokenizer import TOKENIZER_FILES
from placement_search.devnet.transport import FINAL_DELTA, MAX_TOTAL_BYTES, MiB, pack, unpack
from placement_search.evaluators import load_supernet
from placement_search.files import load_json, write_json_atomic

#: The three GPU calls' time budgets, minutes (the issue: <= 15 minutes of GPU time, each call < 9).
CALL1_TEACHER_MINUTES = 4.0
CALL2_DISTILL_MINUTES = 5.0
PREFLIGHT_MINUTES = 1.5  # fla autotune + FlexAttention compilation of fwd+bwd, all four mixers
EVIDENCE_MINUTES = 1.0
STABILITY_MINUTES = 0.5
STARTUP_MINUTES = 0.4  # wheel install, imports, corpus load, pack
GZ_RATIO = 0.80  # gzip on bf16 weights (measured ~0.79 on Gaussian bf16; the dry run measures its own)

#: What each call brings back (entries of the run directory), and the optional entries in priority order.
CALL1_ENTRIES = ("teacher", "teacher-log.jsonl", "preflight.json", "summary.json", "settings.json")
CALL2_ENTRIES = (FINAL_DELTA, "distill-log.jsonl", "supernet-init.json", "evidence.json", "evidence.md",
                 "stability.json", "stability.md", "summary.json", "settings.json")  # fmt: skip


def snapshot_priority(steps: list[int]) -> list[int]:
    """Which intermediate snapshots to bring back first: the earliest, the last, then the others."""
    if len(steps) <= 2:
        return list(steps)
    return [steps[0], steps[-1], *steps[1:-1]]


def crop_corpus(corpus: Corpus, seq_len: int) -> Corpus:
    """``corpus`` with synthetic blocks cut to ``seq_len`` and the queries that no longer fit dropped."""
    keep = (corpus.kv_answer_start + corpus.kv_answer_len <= seq_len) & (corpus.kv_definition_start >= 0)
    return dataclasses.replace(
        corpus,
        synthetic_train=np.ascontiguousarray(corpus.synthetic_train[:, :seq_len]),
        synthetic_heldout=np.ascontiguousarray(corpus.synthetic_heldout[:, :seq_len]),
        kv_block=corpus.kv_block[keep], kv_answer_start=corpus.kv_answer_start[keep],
        kv_answer_len=corpus.kv_answer_len[keep], kv_definition_start=corpus.kv_definition_start[keep],
    )  # fmt: skip


def dry_settings(base: Settings, seq_len: int = 64) -> Settings:
    """``base``'s model at full size; 2 teacher steps, 3 distillation steps, 2-row batches, a small evidence."""
    stage = {"batch_size": 2, "warmup_steps": 1, "save_every": 2, "eval_every": 2, "eval_blocks": 1,
             "log_every": 1, "minutes": 1.0}  # fmt: skip
    return dataclasses.replace(
        base,
        preset=f"{base.preset}-dry-run",
        corpus=dataclasses.replace(base.corpus, seq_len=seq_len),
        teacher=dataclasses.replace(base.teacher, steps=2, micro_batches=1, **stage),
        distill=dataclasses.replace(base.distill, steps=3, micro_batches=2, kept_checkpoints=2, **stage),
        evidence=EvidenceSettings(random_placements=1, arrangements=0, eval_blocks=2, kv_blocks=2, batch_size=2,
                                  seed=base.evidence.seed,
                                  groups=("uniform", "random", "half_attention_sliding_window")),
    )  # fmt: skip


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def gpu_plan(settings: Settings, estimate: dict[str, Any] | None, gz_ratio: float = GZ_RATIO) -> dict[str, Any]:
    """Stages, budgets, expected steps and the files each call brings back (sizes from the parameter counts)."""
    spec = model_spec(settings.size)
    bf16 = 2
    teacher_b = spec.placement_params(["attention"] * spec.num_layers) * bf16
    supernet_b = spec.supernet_params() * bf16
    mixers_b = (spec.supernet_params() - spec.shared_params()) * bf16
    est = (estimate or {}).get("stages", {})

    def steps(stage: str, minutes: float) -> int | None:
        s = est.get(stage, {}).get("estimated_step_s")
        return int(minutes * 60 * 0.9 / s) if s else None

    kept = settings.distill.kept_checkpoints
    budget = MAX_TOTAL_BYTES - 1 * MiB  # logs, evidence, summaries
    back, left = [], []
    room = budget - mixers_b * gz_ratio
    for k in range(kept):
        if room >= mixers_b * gz_ratio:
            back.append(k)
            room -= mixers_b * gz_ratio
        else:
            left.append(k)
    call1 = STARTUP_MINUTES + PREFLIGHT_MINUTES + CALL1_TEACHER_MINUTES
    call2 = STARTUP_MINUTES + CALL2_DISTILL_MINUTES + EVIDENCE_MINUTES + STABILITY_MINUTES
    return {
        "calls": {
            "call1": {"stages": ["corpus (shipped, checked)", "preflight", "teacher"], "minutes": round(call1, 2),
                      "teacher_minutes": CALL1_TEACHER_MINUTES,
                      "teacher_steps_estimate": steps("teacher", CALL1_TEACHER_MINUTES),
                      "returns_mib": round((teacher_b * gz_ratio + 0.5 * MiB) / MiB, 1)},
            "call2": {"stages": ["supernet (distillation)", "evidence", "stability"], "minutes": round(call2, 2),
                      "distill_minutes": CALL2_DISTILL_MINUTES,
                      "distill_steps_estimate": steps("distill", CALL2_DISTILL_MINUTES),
                      "snapshots_kept_on_gpu": kept, "snapshots_returned": len(back),
                      "snapshots_left_on_gpu": len(left),
                      "returns_mib": round((mixers_b * gz_ratio * (1 + len(back)) + 1 * MiB) / MiB, 1)},
        },
        "total_minutes": round(call1 + call2, 2),
        "sizes_mb": {"teacher_bf16": teacher_b / 1e6, "supernet_bf16": supernet_b / 1e6,
                     "snapshot_overlay_bf16": mixers_b / 1e6, "final_as_delta_over_teacher": mixers_b / 1e6},
        "shipped_mb": {"supernet": supernet_b / 1e6, "teacher": teacher_b / 1e6,
                       "snapshots": len(back) * mixers_b / 1e6,
                       "total_checkpoints": (supernet_b + teacher_b + len(back) * mixers_b) / 1e6,
                       "limits": {"final": 40, "total": 120}},
        "gz_ratio_assumed": gz_ratio,
        "return_limits": {"files": 8, "file_mib": 16, "total_mib": 64, "packed_total_mib": MAX_TOTAL_BYTES / MiB},
    }  # fmt: skip


def dry_run(src: str | Path, device: str | torch.device = "cpu", work: str | Path | None = None,
            seq_len: int = 64) -> dict[str, Any]:  # fmt: skip
    """Run the dry run (see the module docstring) from the shipped run directory ``src``; returns a report."""
    src = Path(src)
    device = torch.device(device)
    t_start = time.perf_counter()
    base = full_settings()
    for f in (CORPUS_FILE, MANIFEST_FILE, "tokenizer/tokenizer.json"):
        if not (src / f).exists():
            raise FileNotFoundError(f"{src / f}: the dry run needs the shipped corpus and tokenizer")
    manifest = load_json(src / MANIFEST_FILE)
    if manifest["settings"] != json.loads(json.dumps(dataclasses.asdict(base.corpus))):
        raise ValueError(f"{src / MANIFEST_FILE}: built with other corpus settings than the full preset's")
    settings = dry_settings(base, seq_len)
    own_tmp = work is None
    work = Path(tempfile.mkdtemp(prefix="devnet-dry-run-")) if work is None else Path(work)
    report: dict[str, Any] = {"work": str(work), "device": str(device)}
    try:
        run = work / "run"
        run.mkdir(parents=True, exist_ok=True)
        crop_corpus(Corpus.load(src / CORPUS_FILE), seq_len).save(run / CORPUS_FILE)
        write_json_atomic(run / MANIFEST_FILE, {**manifest, "settings": dataclasses.asdict(settings.corpus)})
        (run / "tokenizer").mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copyfile(src / "tokenizer" / name, run / "tokenizer" / name)
        from placement_search.devnet.train import run_pipeline

        t0 = time.perf_counter()
        summary = run_pipeline(run, settings, device)
        report["pipeline_s"] = time.perf_counter() - t0
        report["timings_s"] = summary["timings_s"]
        report["params"] = summary["params"]
        report["evidence_checks"] = summary.get("evidence_checks")
        report["stability"] = summary.get("stability")
        # snapshots: overlay on the final == materialised directory; sizes
        snaps = sorted(run.glob("supernet-step*"))
        final = load_supernet(run / "supernet", dtype=torch.float32)
        overlaid = load_snapshot(snaps[0], final)
        materialized = load_snapshot(snaps[0], run / "supernet", dtype=torch.float32)
        same = all(torch.equal(a, b) for a, b in zip(overlaid.state_dict().values(),
                                                     materialized.state_dict().values(), strict=True))  # fmt: skip
        report["snapshots"] = {p.name: _dir_bytes(p) for p in snaps}
        report["snapshot_overlay_equals_materialized"] = same
        report["checkpoint_bytes"] = {"teacher": _dir_bytes(run / "teacher"), "supernet": _dir_bytes(run / "supernet")}
        # transport: both calls' packs under the real limits, unpacked into a fresh directory
        snapshot_from_checkpoint(run / "supernet", run / FINAL_DELTA, load_json(run / "supernet" / "devnet.json"))
        steps = [int(p.name.removeprefix("supernet-step")) for p in snaps]
        optional = [f"supernet-step{s:06d}" for s in snapshot_priority(steps)]
        out1, out2 = work / "OUT1", work / "OUT2"
        m1 = pack(run, out1, "devnet-call1", [e for e in CALL1_ENTRIES if (run / e).exists()])
        m2 = pack(run, out2, "devnet-call2", CALL2_ENTRIES, optional)
        back = work / "back"
        unpack(out1, back)
        unpack(out2, back)
        rebuilt = load_supernet(back / "supernet", dtype=torch.float32)
        final = load_supernet(run / "supernet", dtype=torch.float32)  # the one above now holds a snapshot
        report["unpacked_supernet_equals_final"] = all(
            torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), final.state_dict().values(), strict=True)
        )
        materialize_snapshot(back / optional[0], back / "supernet", work / "check-materialize")
        report["packs"] = {m["name"]: {"files": len(m["parts"]) + 1, "bytes": m["total_bytes"],
                                       "optional_taken": m["optional_taken"]} for m in (m1, m2)}  # fmt: skip
        raw = _dir_bytes(run / optional[0])
        report["gz_ratio_measured"] = None
        if raw:
            from placement_search.devnet.transport import compressed_size

            files = sorted(f for f in (run / optional[0]).rglob("*") if f.is_file())
            report["gz_ratio_measured"] = compressed_size(run, files) / raw
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    report["total_s"] = time.perf_counter() - t_start
    estimate_path = src / "gpu-estimate.json"
    estimate = load_json(estimate_path) if estimate_path.exists() else None
    report["plan"] = gpu_plan(base, estimate, max(GZ_RATIO, report.get("gz_ratio_measured") or 0.0))
    return report
