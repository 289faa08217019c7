"""devnet: the tiny pipeline end to end on CPU, interrupted and resumed, and what it saves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from placement_search.devnet.config import EvidenceSettings, tiny_settings
from placement_search.devnet.corpus import Corpus
from placement_search.devnet.evaluate import EvalSet, block_metrics
from placement_search.devnet.evidence import kendall_tau_b, spearman
from placement_search.devnet.snapshots import (
    SnapshotError,
    load_snapshot,
    materialize_snapshot,
    overlay_snapshot,
)
from placement_search.devnet.train import PipelineError, run_pipeline
from placement_search.devnet.transfer import is_shared
from placement_search.devnet.transport import TransportError, compressed_size, pack, unpack
from placement_search.evaluators import load_supernet, load_tokenizer


def _settings():
    s = tiny_settings()
    fast = {"steps": 5, "save_every": 100, "eval_every": 100, "eval_blocks": 2}
    return dataclasses.replace(
        s,
        teacher=dataclasses.replace(s.teacher, **fast),
        distill=dataclasses.replace(s.distill, kept_checkpoints=4, **fast),
        evidence=EvidenceSettings(random_placements=1, arrangements=0, eval_blocks=2, kv_blocks=4, batch_size=4,
                                  groups=("uniform", "random", "half_attention_sliding_window")),
    )


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("devnet")
    settings = _settings()
    first = run_pipeline(out, settings, "cpu", stop_after={"teacher": 3})
    teacher_log_1 = _log(out / "teacher-log.jsonl")
    second = run_pipeline(out, settings, "cpu", stop_after={"supernet": 2})
    third = run_pipeline(out, settings, "cpu")
    return out, settings, (first, second, third), teacher_log_1


def test_resume_continues(run):
    out, settings, (first, second, third), teacher_log_1 = run
    assert first["teacher"]["steps"] == 3 and "supernet" not in first
    assert [r["step"] for r in teacher_log_1 if r["kind"] == "train"] == [1, 2, 3]
    assert second["teacher"] == {**second["teacher"], "steps": 5, "total_steps": 5, "resumed_from": 3}
    assert second["supernet"]["steps"] == 2
    assert third["supernet"] == {"steps": 5, "total_steps": 5, "resumed_from": 2}
    for log in ("teacher-log.jsonl", "distill-log.jsonl"):
        steps = [r["step"] for r in _log(out / log) if r["kind"] == "train"]
        assert steps == [1, 2, 3, 4, 5], log
    assert json.loads((out / "supernet-state" / "state.json").read_text())["step"] == 5
    # finished stages are skipped; changed settings are refused
    again = run_pipeline(out, settings, "cpu")
    assert again["supernet"] == third["supernet"]
    with pytest.raises(PipelineError, match="settings differ"):
        run_pipeline(out, dataclasses.replace(settings, save_dtype="float32"), "cpu")


def test_outputs_load_and_reproduce(run):
    out, _, _, _ = run
    kept = sorted(p.name for p in out.glob("supernet-step*"))
    assert kept == ["supernet-step000001", "supernet-step000002", "supernet-step000003", "supernet-step000004"]
    assert load_tokenizer(out / "supernet").eos_token == "<|endoftext|>"
    model = load_supernet(out / "supernet", dtype=torch.float32)
    assert model.spec.num_layers == 4 and set(model.spec.mixer_names) == {"attention", "sliding_window", "gdn", "kda"}
    evidence = json.loads((out / "evidence.json").read_text())
    corpus = Corpus.load(out / "corpus.npz")
    data = EvalSet.from_corpus(corpus, range(2), range(4), torch.device("cpu"), 4)
    for name in ("all_attention", "all_gdn", "all_kda"):
        placement = evidence["placements"][name]["placement"]
        model.set_placement(placement)
        loss = block_metrics(model, data)["loss"].mean()
        assert loss == pytest.approx(evidence["placements"][name]["loss_A"], rel=1e-6)
        thin = load_supernet(out / "supernet", [placement], dtype=torch.float32)
        thin.set_placement(placement)
        x = data.blocks[:2]
        with torch.no_grad():
            assert torch.equal(thin(x), model(x))
    assert set(evidence["checks"]) >= {"all_attention_matches_teacher", "placements_spread",
                                       "swa_fails_beyond_window", "arrangement_matters"}  # fmt: skip
    assert (out / "evidence.md").read_text().startswith("# Dev supernet")
    manifest = json.loads((out / "corpus-manifest.json").read_text())
    assert {f["split"] for f in manifest["files"]} == {"train", "heldout"}
    assert np.load(out / "corpus.npz", allow_pickle=False)["train_tokens"].dtype == np.uint16


def test_distillation_froze_shared_tensors(run):
    out, _, _, _ = run

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(path / "model.safetensors", "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    teacher, supernet = tensors(out / "teacher"), tensors(out / "supernet")
    first = tensors(materialize_snapshot(out / "supernet-step000001", out / "supernet", out / "check-step1"))
    assert all(torch.equal(first[k], supernet[k]) for k in supernet if is_shared(k))
    shared = [k for k in supernet if is_shared(k)]
    assert shared and all(torch.equal(supernet[k], teacher[k]) for k in shared)
    mixer_keys = [k for k in supernet if not is_shared(k)]
    assert any(not torch.equal(supernet[k], first[k]) for k in mixer_keys)  # mixers trained
    assert supernet[mixer_keys[0]].dtype == torch.bfloat16


def test_snapshots_overlay_and_stability(run, tmp_path):
    out, _, _, _ = run
    snaps = sorted(out.glob("supernet-step*"))
    assert all((p / "snapshot.json").is_file() and not (p / "model.safetensors").exists() for p in snaps)
    meta = json.loads((snaps[0] / "snapshot.json").read_text())
    assert meta["step"] == 1 and meta["dtype"] == "bfloat16"
    assert all(".mixer.mixers." in n for names in meta["files"].values() for n in names)
    # overlay in memory == materialised directory loaded; the teacher works as a base too
    a = load_snapshot(snaps[1], load_supernet(out / "supernet", dtype=torch.float32))
    b = load_snapshot(snaps[1], out / "supernet", dtype=torch.float32)
    c = load_snapshot(snaps[1], out / "teacher", dtype=torch.float32)
    for (n, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(x, y) and torch.equal(x, z), n
    # a base with other frozen tensors is refused
    other = load_supernet(out / "supernet", dtype=torch.float32)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(SnapshotError, match="frozen tensors"):
        overlay_snapshot(other, snaps[0])
    # the stability study: one row per snapshot; the final's losses equal the evidence's set-A losses
    stability = json.loads((out / "stability.json").read_text())
    evidence = json.loads((out / "evidence.json").read_text())
    assert [r["snapshot"] for r in stability["snapshots"]] == [p.name for p in snaps]
    for name, loss in stability["final"]["losses"].items():
        assert loss == pytest.approx(evidence["placements"][name]["loss_A"], rel=1e-6)
    assert (out / "stability.md").read_text().startswith("# Dev supernet: ranking stability")


def test_rank_correlations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    # tie-corrected values (scipy: spearmanr 0.9486832980505138, kendalltau 0.9128709291752769)
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(0.9486832980505138)
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(0.9128709291752769)


def test_pack_unpack_rebuilds_final(run, tmp_path):
    out, _, _, _ = run
    from placement_search.devnet.snapshots import snapshot_from_checkpoint

    snapshot_from_checkpoint(out / "supernet", out / "supernet-delta", {"final": True})
    try:
        m1 = pack(out, tmp_path / "o1", "devnet-call1", ["teacher", "teacher-log.jsonl"])
        m2 = pack(out, tmp_path / "o2", "devnet-call2", ["supernet-delta", "evidence.json"],
                  ["supernet-step000001", "supernet-step000004"], part_bytes=200_000, max_total=10**9)
        assert len(m2["parts"]) > 1 and all(p["bytes"] <= 200_000 for p in m2["parts"])
        assert m2["optional_taken"] == ["supernet-step000001", "supernet-step000004"]
        back = tmp_path / "back"
        unpack(tmp_path / "o1", back)
        unpack(tmp_path / "o2", back)
        assert not (back / "supernet-delta").exists()
        x, y = load_supernet(back / "supernet", dtype=torch.float32), load_supernet(out / "supernet", dtype=torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
        assert m1["files"][0].startswith("teacher/")
        # the budget leaves optional entries out, never required ones
        need = compressed_size(out, [out / "evidence.json"])
        small = pack(out, tmp_path / "o3", "devnet-call2", ["evidence.json"], ["supernet-step000001"], max_total=need + 16)
        assert small["optional_taken"] == [] and small["optional_left_out"][0]["entry"] == "supernet-step000001"
        with pytest.raises(TransportError, match="required"):
            pack(out, tmp_path / "o4", "x", ["supernet-delta"], max_total=1000)
        (tmp_path / "o2" / m2["parts"][0]["file"]).write_bytes(b"corrupt")
        with pytest.raises(TransportError, match="SHA-256"):
            unpack(tmp_path / "o2", tmp_path / "back2")
    finally:
        import shutil

        shutil.rmtree(out / "supernet-delta", ignore_errors=True)


def test_copied_mixers_train_at_a_scaled_learning_rate() -> None:
    from placement_search.devnet.config import full_settings, model_spec
    from placement_search.devnet.distill import copied_lr_scale
    from placement_search.devnet.loop import make_optimizer
    from placement_search.evaluators import random_supernet

    settings = tiny_settings()
    ds = dataclasses.replace(settings.distill, copied_lr_scale=0.1)
    model = random_supernet(model_spec(settings.size), seed=0)
    opt = make_optimizer(model, ds, lambda n: not is_shared(n), lambda n: copied_lr_scale(n, ds))
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if is_shared(name):
            assert id(p) not in scale_of and not p.requires_grad
        elif ".mixers.attention." in name or ".mixers.sliding_window." in name:
            assert scale_of[id(p)] == 0.1
        else:
            assert scale_of[id(p)] == 1.0
    assert full_settings().distill.copied_lr_scale == 0.1
