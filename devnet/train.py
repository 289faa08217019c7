"""The end-to-end pipeline: corpus -> tokenizer -> teacher -> supernet -> evidence, resumable by stage.

Everything lands in one output directory (``results/devnet`` by default):

=============================  ===========================================================================
``settings.json``              the :class:`~.config.Settings` of the run (a resumed run must match them)
``corpus.npz``                 token arrays (see :mod:`.corpus`); ``corpus-manifest.json``: files and split
``tokenizer/``                 ``tokenizer.json`` + ``tokenizer_config.json``
``teacher/``                   the all-attention teacher (Apriel2, bf16, with tokenizer)
``supernet/``                  the final supernet (Apriel2 supernet format, bf16, with tokenizer)
``supernet-step{N:06d}/``      intermediate snapshots: mixer tensors only, overlaid on ``supernet/`` by
                               :mod:`.snapshots` (``stability.json``/``.md``: ranking stability over them)
``*-state/``                   resumable training states (fp32 weights, optimiser, RNG; not for shipping)
``teacher-log.jsonl``          per-step losses and periodic evaluations; ``distill-log.jsonl`` likewise
``supernet-init.json``         which teacher slices initialised which GDN/KDA tensors
``evidence.json``/``.md``      :mod:`.evidence`
``summary.json``               stage timings, final metrics, parameter counts and down-sampled loss curves
=============================  ===========================================================================

A stage is skipped when its output exists (the corpus when ``corpus.npz``, its manifest and the tokenizer
exist; the teacher when ``teacher/config.json`` does; ...); an interrupted training stage resumes from its
state directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from placement_search.devnet.config import Settings, model_spec, register_devnet_spec
from placement_search.devnet.corpus import CORPUS_FILE, MANIFEST_FILE, Corpus, build_corpus, select_files
from placement_search.devnet.distill import train_supernet
from placement_search.devnet.evidence import run_evidence, run_stability
from placement_search.devnet.snapshots import is_snapshot
from placement_search.devnet.state import JsonlLog
from placement_search.devnet.teacher import train_teacher
from placement_search.devnet.tokenizer import load_tokenizer_json, save_tokenizer, train_tokenizer
from placement_search.errors import PlacementSearchError
from placement_search.evaluators import load_supernet
from placement_search.files import load_json, write_json_atomic

STAGES = ("corpus", "teacher", "supernet", "evidence", "stability")


class PipelineError(PlacementSearchError):
    """A run that cannot start or resume (settings mismatch, missing inputs)."""


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [] if list(a) == list(b) else [path]
    return [] if a == b else [path]


def check_settings(out: Path, settings: Settings, overwrite: bool = False) -> None:
    """Write ``settings.json``, or check that a previous run's equals ``settings``."""
    path = out / "settings.json"
    current = json.loads(json.dumps(settings.to_dict()))
    if path.exists() and not overwrite:
        previous = load_json(path)
        diff = _diff(previous, current)
        if diff:
            raise PipelineError(
                f"{path}: this run's settings differ from the previous run's at {', '.join(diff[:6])}; "
                "use another --out, or --overwrite-settings to continue with the new ones"
            )
        return
    write_json_atomic(path, current)


def _curve(records: list[dict[str, Any]], key: str, points: int = 200) -> list[list[float]]:
    """``[[step, value], ...]`` down-sampled to about ``points`` entries."""
    rows = [(r["step"], r[key]) for r in records if r.get("kind") == "train" and key in r]
    stride = max(1, len(rows) // points)
    picked = rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else [])
    return [[s, float(v)] for s, v in picked]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def prepare_gpu(out: Path, spec: Any, device: torch.device) -> dict[str, str]:
    """Kernel paths for this run: from ``out/preflight.json`` when an earlier call checked them, else checked
    now (:mod:`.preflight`) and recorded there. Also lifts torch.compile's recompilation limit (FlexAttention is
    compiled once per batch shape and grad mode)."""
    from placement_search.devnet.preflight import apply_backends, run_preflight

    dynamo = getattr(torch, "_dynamo", None)
    for key in ("cache_size_limit", "recompile_limit"):
        if dynamo is not None and hasattr(dynamo.config, key):
            setattr(dynamo.config, key, max(64, getattr(dynamo.config, key)))
    path = out / "preflight.json"
    if path.exists():
        return apply_backends(load_json(path)["backends"])
    report = run_preflight(spec, device)
    write_json_atomic(path, report)
    print(f"preflight: kernel paths {report['backends']} (fallbacks: {report['fallbacks_used'] or 'none'})",
          flush=True)  # fmt: skip
    return report["backends"]


def run_pipeline(
    out: str | Path,
    settings: Settings,
    device: str | torch.device = "cpu",
    *,
    stages: Iterable[str] = STAGES,
    overwrite_settings: bool = False,
    stop_after: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the requested stages; returns the summary written to ``out/summary.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    stages = tuple(stages)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    check_settings(out, settings, overwrite_settings)
    stop_after = stop_after or {}
    spec = model_spec(settings.size)
    summary_path = out / "summary.json"
    summary: dict[str, Any] = load_json(summary_path) if summary_path.exists() else {"timings_s": {}}
    summary["device"] = str(device)
    summary["torch"] = torch.__version__
    summary["params"] = {
        "supernet": spec.supernet_params(),
        "all_attention_placement": spec.placement_params(["attention"] * spec.num_layers),
        "shared": spec.shared_params(),
    }

    def timed(stage: str, t0: float) -> None:
        summary["timings_s"][stage] = summary["timings_s"].get(stage, 0.0) + time.perf_counter() - t0
        write_json_atomic(summary_path, summary)

    # -- corpus and tokenizer -------------------------------------------------------------------
    have_corpus = all((out / f).exists() for f in (CORPUS_FILE, MANIFEST_FILE, "tokenizer/tokenizer.json"))
    if "corpus" in stages and not have_corpus:
        t0 = time.perf_counter()
        files, skipped = select_files(settings.corpus)
        train_texts = [f.text for f in files if f.split == "train"]
        if not train_texts or not any(f.split == "heldout" for f in files):
            raise PipelineError("the corpus needs train and held-out files; raise max_files or heldout_permille")
        tok = train_tokenizer(train_texts, settings.size.vocab_size, min_frequency=settings.tokenizer_min_frequency)
        save_tokenizer(tok, out / "tokenizer", model_max_length=settings.size.max_position_embeddings)
        build_corpus(files, skipped, tok, settings.corpus, settings.size.window_size, out)
        timed("corpus", t0)
    if not all((out / f).exists() for f in (CORPUS_FILE, MANIFEST_FILE, "tokenizer/tokenizer.json")):
        raise PipelineError(f"{out}: no corpus yet (run the 'corpus' stage first)")
    manifest = load_json(out / MANIFEST_FILE)
    if _diff(manifest["settings"], json.loads(json.dumps(settings.corpus.__dict__))):
        raise PipelineError(f"{out / MANIFEST_FILE}: built with other corpus settings than this run's")
    vocab = load_tokenizer_json(out / "tokenizer").get_vocab_size()
    if vocab > settings.size.vocab_size:
        raise PipelineError(f"tokenizer has {vocab} entries, more than the model's vocab_size {settings.size.vocab_size}")
    corpus = Corpus.load(out / CORPUS_FILE)
    summary["corpus"] = manifest["counts"]
    if device.type == "cuda" and set(stages) - {"corpus"}:
        summary["backends"] = prepare_gpu(out, spec, device)
        write_json_atomic(summary_path, summary)

    # -- teacher ----------------------------------------------------------------------------------
    if "teacher" in stages and not (out / "teacher" / "config.json").exists():
        t0 = time.perf_counter()
        result, final = train_teacher(settings, spec, corpus, out, device, stop_after.get("teacher"))
        timed("teacher", t0)
        summary["teacher"] = {"steps": result.steps, "total_steps": result.total_steps,
                              "resumed_from": result.resumed_from, "final_eval": final}  # fmt: skip
        write_json_atomic(summary_path, summary)
        if not result.finished:
            return summary
    # -- supernet -------------------------------------------------------------------------------
    teacher = None
    if "supernet" in stages and not (out / "supernet" / "config.json").exists():
        if not (out / "teacher" / "config.json").exists():
            raise PipelineError(f"{out}: no teacher yet (run the 'teacher' stage first)")
        teacher = load_supernet(out / "teacher", device=device, dtype=torch.float32)
        t0 = time.perf_counter()
        result, _ = train_supernet(settings, spec, teacher, corpus, out, device, stop_after.get("supernet"))
        timed("supernet", t0)
        summary["supernet"] = {"steps": result.steps, "total_steps": result.total_steps,
                               "resumed_from": result.resumed_from}  # fmt: skip
        write_json_atomic(summary_path, summary)
        if not result.finished:
            return summary
    # -- evidence -------------------------------------------------------------------------------
    supernet = None
    if "evidence" in stages and not (out / "evidence.json").exists():
        if not (out / "supernet" / "config.json").exists():
            raise PipelineError(f"{out}: no supernet yet (run the 'supernet' stage first)")
        t0 = time.perf_counter()
        if teacher is None:
            teacher = load_supernet(out / "teacher", device=device, dtype=torch.float32)
        supernet = load_supernet(out / "supernet", device=device, dtype=torch.float32)
        evidence = run_evidence(settings, supernet, teacher, corpus, out, device)
        timed("evidence", t0)
        summary["evidence_checks"] = {k: v.get("passes") for k, v in evidence["checks"].items()}
    # -- ranking stability over the intermediate snapshots ---------------------------------------
    snapshots = sorted(p for p in out.glob("supernet-step*") if is_snapshot(p))
    if "stability" in stages and snapshots and not (out / "stability.json").exists():
        if not (out / "supernet" / "config.json").exists():
            raise PipelineError(f"{out}: no supernet yet (run the 'supernet' stage first)")
        t0 = time.perf_counter()
        if supernet is None:
            supernet = load_supernet(out / "supernet", device=device, dtype=torch.float32)
        evidence = load_json(out / "evidence.json") if (out / "evidence.json").exists() else None
        stability = run_stability(settings, supernet, snapshots, corpus, out, device, evidence)
        timed("stability", t0)
        summary["stability"] = {r["snapshot"]: {"spearman": r["spearman_vs_final"], "kendall": r["kendall_vs_final"]}
                                for r in stability["snapshots"]}  # fmt: skip
    if (out / "supernet" / "config.json").exists():
        summary["registered_spec"] = "devnet" if register_devnet_spec(out / "supernet") else None
    summary["curves"] = {
        "teacher_loss": _curve(JsonlLog(out / "teacher-log.jsonl", resume_step=10**12).read(), "loss"),
        "distill_kl": _curve(JsonlLog(out / "distill-log.jsonl", resume_step=10**12).read(), "kl"),
    }
    summary["checkpoint_bytes"] = {p.name: _dir_bytes(p) for p in sorted(out.iterdir())
                                   if p.is_dir() and (p / "config.json").exists()}  # fmt: skip
    for stage in ("teacher", "supernet"):
        state = out / f"{'teacher' if stage == 'teacher' else 'supernet'}-state" / "state.json"
        if state.exists():
            extra = load_json(state).get("extra", {})
            summary.setdefault("schedule", {})[stage] = {
                "calibrated_step_s": extra.get("calibrated_step_s"), "deadline_stop": extra.get("deadline_stop"),
            }  # fmt: skip
    write_json_atomic(summary_path, summary)
    return summary
