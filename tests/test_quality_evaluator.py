"""Quality evaluator: lm-eval model class, task pack, quality score, campaign runner, CLI (tiny CPU model)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from conftest import runtime_tiny_config  # noqa: E402

from placement_search.devnet.config import CorpusSettings  # noqa: E402
from placement_search.devnet.corpus import Corpus, SourceFile, build_corpus  # noqa: E402
from placement_search.devnet.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from placement_search.errors import PlacementSearchError  # noqa: E402
from placement_search.evaluators import load_tokenizer, random_supernet, save_checkpoint  # noqa: E402
from placement_search.evaluators.campaign import load_results, run_campaign, sample_placements  # noqa: E402
from placement_search.evaluators.lm_eval_model import PlacementSearchLM  # noqa: E402
from placement_search.evaluators.quality import aggregate_retention, retention, task_retentions  # noqa: E402
from placement_search.evaluators.tasks import build_task_pack, build_teacher_traces, load_pack_manifest  # noqa: E402
from placement_search.placement import Placement  # noqa: E402
from placement_search.spec import ModelSpec  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEQ = 96


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("quality")
    texts = ["".join(f"def f_{k}_{i}(x, y):\n    v = x * {i} + y\n    return v - {k}\n\n" for i in range(12))
             for k in range(8)]  # fmt: skip
    files = [SourceFile(f"m{k}.py", "heldout" if k < 4 else "train", t, hashlib.sha256(t.encode()).hexdigest())
             for k, t in enumerate(texts)]  # fmt: skip
    tok = train_tokenizer(texts, 300, min_frequency=1)
    cfg = runtime_tiny_config(2)
    cfg["vocab_size"] = 300
    cfg["embeddings"]["max_position_embeddings"] = SEQ
    settings = CorpusSettings(seq_len=SEQ, synthetic_train_blocks=1, synthetic_heldout_blocks=4, seed=1)
    build_corpus(files, [], tok, settings, window=5, out_dir=root / "corpus")
    model = random_supernet(ModelSpec.from_config(cfg, name="tiny"), seed=0)
    save_checkpoint(model, root / "ckpt")
    save_tokenizer(tok, root / "ckpt", model_max_length=SEQ)
    corpus = Corpus.load(root / "corpus" / "corpus.npz")
    tokenizer = load_tokenizer(root / "ckpt")
    build_task_pack(corpus, tokenizer, root / "tasks", window=5, bpb_docs=6, kv_queries_per_bin=4, mc_docs=6)
    build_teacher_traces(model, tokenizer, corpus, root / "tasks", prompts=3, prompt_tokens=8, new_tokens=6)
    return {"root": root, "model": model, "tokenizer": tokenizer, "ckpt": root / "ckpt", "tasks": root / "tasks"}


def test_pack_manifest_and_yaml(pack: dict) -> None:
    manifest = load_pack_manifest(pack["tasks"])
    names = {t["name"] for t in manifest["tasks"]}
    assert {"ps_code_bpb", "ps_code_mc", "ps_teacher_trace"} <= names
    assert any(n.startswith("ps_kv_ll_") for n in names) and any(n.startswith("ps_kv_mc_") for n in names)
    for t in manifest["tasks"]:
        data = pack["tasks"] / t["data_file"]
        assert hashlib.sha256(data.read_bytes()).hexdigest() == t["sha256"]
        assert str(data.resolve()) in (pack["tasks"] / f"{t['name']}.yaml").read_text()
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        assert len(rows) == t["docs"] > 0
        if "choices" in rows[0]:
            assert all(r["choices"][r["label"]] not in r["choices"][: r["label"]] for r in rows)


def test_model_class_matches_direct_logprobs(pack: dict) -> None:
    model, tok = pack["model"], pack["tokenizer"]
    lm = PlacementSearchLM(model=model, tokenizer=tok, placement="gdn+attention", batch_size=2)
    assert model.placement == ("gdn", "attention")

    class Req:
        def __init__(self, *args: object) -> None:
            self.args = args

    pairs = [("def f(x):\n", "    return x\n"), ("def f(x):\n    return", " x\n"), ("", "v = 1\n")]
    got = lm.loglikelihood([Req(*p) for p in pairs])
    eos = tok.eos_token_id
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c = [eos, *tok.encode(ctx, add_special_tokens=False)]
        t = tok.encode(cont, add_special_tokens=False)
        x = torch.tensor([c + t])
        with torch.no_grad():
            logp = model(x)[0, :-1].float().log_softmax(-1)
        pos = torch.arange(len(c) - 1, len(c) + len(t) - 1)
        expect = logp[pos, torch.tensor(t)]
        assert ll == pytest.approx(float(expect.sum()), rel=1e-4, abs=1e-4)
        assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(t)).all())
    text = "x = 1\n" * 40  # longer than one window: rolling windows sum to the whole text's log-likelihood
    lm.scorer.max_length = lm.encoder.max_length = 32
    (rolled,) = lm.loglikelihood_rolling([Req(text)])
    ids = [eos, *tok.encode(text, add_special_tokens=False)]
    assert len(ids) > 33
    total = 0.0
    with torch.no_grad():
        for start in range(1, len(ids), 32):  # disjoint windows, each after at most 32 tokens of context
            lo = max(0, start + 32 - 33) if start + 32 <= len(ids) else max(0, len(ids) - 33)
            seq = ids[lo : min(len(ids), start + 32)]
            logp = model(torch.tensor([seq]))[0, :-1].float().log_softmax(-1)
            tgt = torch.tensor(seq[1:])
            lp = logp.gather(-1, tgt[:, None])[:, 0]
            total += float(lp[start - lo - 1 :].sum())
    assert rolled == pytest.approx(total, rel=1e-4)
    (gen,) = lm.generate_until([Req("def f", {"until": ["\n\n"], "max_gen_toks": 5})])
    assert isinstance(gen, str)


def test_shared_context_scored_from_one_context_pass(pack: dict) -> None:
    from placement_search.evaluators.lm_eval_model import Scorer

    model = pack["model"]
    ctx = tuple(range(3, 40))  # longer than the sliding window (5): the ring cache wraps during the prefill
    choices = [(50, 51, 52, 53), (60,), (70, 71), (80, 81, 82), (90, 91)]
    requests = [(ctx, c) for c in choices] + [((5, 6), (7, 8, 9))]  # the last one is forwarded whole
    scorer = Scorer(model, batch_size=4, max_length=SEQ)
    plan = scorer.plan(requests)
    assert plan.num_tokens == len(ctx) + sum(len(c) - 1 for c in choices) + 4  # one context pass
    for placement in ["attention,sliding_window", "gdn,kda", "kda,attention", "sliding_window,gdn"]:
        model.set_placement(placement)
        got = scorer.score(plan)
        for (c, t), (ll, greedy) in zip(requests, got, strict=True):
            with torch.no_grad():
                logp = model(torch.tensor([c + t]))[0, :-1].float().log_softmax(-1)
            rows = logp[len(c) - 1 :]
            # decode steps vs one forward: the same sums in another order (float32 rounding, ~1e-6 relative)
            assert ll == pytest.approx(float(rows.gather(-1, torch.tensor(t)[:, None]).sum()), rel=1e-5, abs=1e-5)
            assert greedy == bool((rows.argmax(-1) == torch.tensor(t)).all())
    # without context sharing (the GPU plan): every request forwarded whole, the same scores
    from placement_search.evaluators.lm_eval_model import ScoringPlan

    whole = ScoringPlan(requests, SEQ, 4, share_contexts=False)
    assert not whole.chunks and whole.num_tokens == 40 + 38 + 39 + 38 + 4  # ctx+(60,) is a prefix of ctx+(50, ...)
    for placement in ["attention,sliding_window", "gdn,kda"]:
        model.set_placement(placement)
        a, b = scorer.score(plan), whole.run(model)
        for (la, ga), (lb, gb) in zip(a, b, strict=True):
            assert la == pytest.approx(lb, rel=1e-5, abs=1e-5) and ga == gb


def test_simple_evaluate_equals_campaign_and_resume(pack: dict, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [t["name"] for t in load_pack_manifest(pack["tasks"])["tasks"]]
    lm = PlacementSearchLM(pretrained=str(pack["ckpt"]), placement="kda+sliding_window", batch_size=3)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, bootstrap_iters=0, log_samples=False,
                                  task_manager=TaskManager(include_path=str(pack["tasks"]), include_defaults=False))
    space = lm.model.spec.search_space
    placements = ["kda,sliding_window", "attention,attention", "gdn,kda", "sliding_window,gdn"]
    db = tmp_path / "r.sqlite"

    def crash(i: int, _: object) -> None:
        if i == 1:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        run_campaign(pack["ckpt"], pack["tasks"], placements, db, batch_size=5, progress=False, on_placement=crash)
    assert len(load_results(db).placement.unique()) == 2
    summary = run_campaign(pack["ckpt"], pack["tasks"], placements, db, batch_size=5, progress=False)
    assert (summary.evaluated, summary.skipped) == (2, 2)
    again = run_campaign(pack["ckpt"], pack["tasks"], placements, db, batch_size=5, progress=False)
    assert (again.evaluated, again.skipped) == (0, 4)
    df = load_results(db)
    assert not df.duplicated(["placement", "task", "metric"]).any()
    assert set(df.placement) == {Placement.parse(p, space).code() for p in placements}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 4 * len(names)
    mine = df[df.placement == lm.placement.code()]
    for task in names:
        for metric, value in res["results"][task].items():
            if metric in ("alias", "name", "sample_len") or "stderr" in metric:
                continue
            stored = mine[(mine.task == task) & (mine.metric == metric)].value
            assert len(stored) == 1, (task, metric)
            assert float(stored.iloc[0]) == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_samplers_dedup(pack: dict) -> None:
    space = pack["model"].spec.search_space
    got = sample_placements(space, "uniform:6,stratified:6,structured:50", seed=3)
    assert len(got) == len(set(got)) == 16  # 4 mixers over 2 layers: 16 placements in all
    with pytest.raises(Exception, match="NAME:COUNT"):
        sample_placements(space, "random:3", seed=0)


def test_quality_retention() -> None:
    assert retention(0.5, 1.0, True) == 0.5
    assert retention(2.0, 1.0, False) == 0.5
    assert retention(1.0, 0.0, True) is None and retention(math.inf, 1.0, False) is None
    higher = {"bpb": False, "acc": True, "zero": True}
    scores, ref = {"bpb": 2.0, "acc": 0.3, "zero": 0.1}, {"bpb": 1.0, "acc": 0.6, "zero": 0.0}
    assert task_retentions(scores, ref, higher) == {"bpb": 0.5, "acc": 0.5}
    assert aggregate_retention(scores, ref, higher) == 0.5
    assert aggregate_retention(ref, ref, higher) == 1.0
    assert math.isnan(aggregate_retention({}, ref, higher))


def test_perplexity_retention_is_on_the_log_scale() -> None:
    # perplexities exp(2) against a reference exp(1): half the retention, not e^-1; bits per byte stays linear
    assert retention(math.exp(2.0), math.exp(1.0), False, log=True) == pytest.approx(0.5)
    assert retention(0.9, 2.0, False, log=True) is None  # a perplexity below 1 is not a loss
    higher, metrics = {"kv": False, "bpb": False}, {"kv": "perplexity,none", "bpb": "bits_per_byte,none"}
    scores, ref = {"kv": math.exp(40.0), "bpb": 2.0}, {"kv": math.exp(10.0), "bpb": 1.0}
    assert task_retentions(scores, ref, higher, metrics) == pytest.approx({"kv": 0.25, "bpb": 0.5})
    assert task_retentions(scores, ref, higher)["kv"] == pytest.approx(math.exp(-30.0))  # without metrics: linear


def test_cli_errors_are_one_line(pack: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from placement_search.cli import main

    bad = tmp_path / "nockpt"
    bad.mkdir()
    empty = tmp_path / "notasks"
    empty.mkdir()
    cases = [
        ["--checkpoint", str(bad), "--tasks", str(pack["tasks"]), "--sample", "uniform:2"],
        ["--checkpoint", str(pack["ckpt"]), "--tasks", str(empty), "--sample", "uniform:2"],
        ["--checkpoint", str(pack["ckpt"]), "--tasks", "ps_missing", "--sample", "uniform:2",
         "--db", str(tmp_path / "x.sqlite")],
    ]  # fmt: skip
    for args in cases:
        assert main(["evaluate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error" in err
    db = tmp_path / "ok.sqlite"
    code = main(["evaluate", "--checkpoint", str(pack["ckpt"]), "--tasks", str(pack["tasks"]), "--sample",
                 "uniform:2,structured:1", "--db", str(db), "--quiet"])  # fmt: skip
    assert code == 0 and len(load_results(db).placement.unique()) == 3


def test_pack_parts_are_disjoint_and_the_pack_moves(pack: dict, tmp_path: Path) -> None:
    import shutil

    from placement_search.evaluators.campaign import load_lm_eval_tasks
    from placement_search.evaluators.tasks import write_relocated_yamls

    corpus = Corpus.load(pack["root"] / "corpus" / "corpus.npz")
    docs = {}
    for k in (0, 1):
        out = tmp_path / f"part{k}"
        build_task_pack(corpus, pack["tokenizer"], out, window=5, bpb_docs=None, kv_queries_per_bin=None, mc_docs=50,
                        part=(k, 2))  # fmt: skip
        assert load_pack_manifest(out)["settings"]["corpus"]["part"] == [k, 2]
        rows = {t: [json.loads(x) for x in (out / f"{t}.jsonl").read_text().splitlines()]
                for t in ("ps_code_bpb", "ps_code_mc")}  # fmt: skip
        kv = [json.loads(x) for f in out.glob("ps_kv_ll_*.jsonl") for x in f.read_text().splitlines()]
        docs[k] = ({r["text"] for r in rows["ps_code_bpb"]}, {r["block"] for r in kv}, {r["context"] for r in rows["ps_code_mc"]})
    for a, b in zip(docs[0], docs[1], strict=True):
        assert a and b and not (a & b)  # other files, other synthetic blocks
    with pytest.raises(Exception, match="part must be"):
        build_task_pack(corpus, pack["tokenizer"], tmp_path / "bad", window=5, part=(2, 2))
    # a pack keeps working when moved (its YAMLs hold absolute paths): the campaign loader relocates them
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "part0", moved)
    shutil.rmtree(tmp_path / "part0")
    tasks = load_lm_eval_tasks(moved)
    assert set(tasks) == {t["name"] for t in load_pack_manifest(moved)["tasks"]}
    (moved / "ps_code_mc.jsonl").write_text("{}\n")
    with pytest.raises(Exception, match="SHA-256"):
        write_relocated_yamls(moved, tmp_path / "y")


def test_campaign_time_budget_and_checkpoint_switch(pack: dict, tmp_path: Path) -> None:
    from placement_search.evaluators.campaign import Campaign

    other = tmp_path / "other"
    model = random_supernet(pack["model"].spec, seed=5)
    save_checkpoint(model, other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((pack["ckpt"] / name).read_bytes())
    db = tmp_path / "c.sqlite"
    campaign = Campaign(pack["ckpt"], pack["tasks"], db, batch_size=4)
    placements = ["gdn,kda", "attention,gdn", "kda,kda"]
    none = campaign.run(placements, progress=False, max_seconds=0)
    assert (none.evaluated, none.left) == (0, 3)
    done = campaign.run(placements, progress=False)
    assert (done.evaluated, done.skipped, done.left) == (3, 0, 0)
    first = campaign.checkpoint_hash
    assert campaign.use_checkpoint(other) != first
    again = campaign.run(placements[:2], progress=False)
    assert again.evaluated == 2 and again.checkpoint_hash == campaign.checkpoint_hash
    df = load_results(db)
    assert df.groupby("checkpoint_hash").placement.nunique().to_dict() == {first: 3, campaign.checkpoint_hash: 2}
    # the pack's sample part is part of every settings hash (other samples are other keys)
    with sqlite3.connect(db) as conn:
        settings = [json.loads(s) for (s,) in conn.execute("SELECT settings FROM settings")]
    assert all("pack_part" in s for s in settings)


def test_dataset_run_final_noise_and_snapshots(pack: dict, tmp_path: Path) -> None:
    from placement_search.devnet import dataset as D
    from placement_search.devnet.snapshots import save_snapshot

    space = pack["model"].spec.search_space
    order = D.dataset_placements(space, "structured:3,stratified:3,uniform:3", seed=1)
    assert len(order) == len(set(order)) == 9
    assert D.spread(order, 3) == [order[0], order[3], order[6]] and D.spread(order, 20) == order
    snap = tmp_path / "snaps" / "supernet-step000007"
    perturbed = random_supernet(pack["model"].spec, seed=0)
    perturbed.load_state_dict(pack["model"].state_dict())
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if ".mixers." in name:
                p.mul_(1.5)
    save_snapshot(perturbed, snap, {"stage": "distill", "step": 7})
    packs = D.build_packs(pack["root"] / "corpus", pack["ckpt"], tmp_path / "work")
    assert {t["name"] for t in load_pack_manifest(packs["tasks-b"])["tasks"]} >= {"ps_code_bpb", "ps_teacher_trace"}
    record = D.build_dataset(pack["ckpt"], [snap], packs, tmp_path / "work" / "db.sqlite", device="cpu",
                             batch_size=8, budget_s=600, noise=2, shared=3, chunk=2,
                             placement_spec="structured:5,stratified:2,uniform:2", progress=False)  # fmt: skip
    stages = {s["stage"]: s for s in record["stages"]}
    assert stages["final/tasks-a"]["evaluated"] == 9 and stages["final/tasks-b"]["evaluated"] == 2
    snap_rows = [s for s in record["stages"] if s["stage"].startswith("supernet-step")]
    assert sum(s["evaluated"] for s in snap_rows) == 3, record["stages"]
    listing = pd.read_csv(tmp_path / "work" / D.PLACEMENTS_FILE)
    assert len(listing) == 9 and listing.noise_set.sum() == 2 and listing.shared_set.sum() == 3
    assert set(listing.sampler) == {"structured", "stratified", "uniform"}
    # a prefix of the same list (a second run's checkpoints on shared placements): noise and shared sets inside it
    limited = D.build_dataset(pack["ckpt"], [], packs, tmp_path / "work2" / "db.sqlite", device="cpu", batch_size=8,
                              budget_s=600, noise=2, shared=3, placement_spec="structured:5,stratified:2,uniform:2",
                              progress=False, final_limit=4)  # fmt: skip
    assert limited["placements_planned"] == 4 and limited["stages"][0]["evaluated"] == 4
    listing2 = pd.read_csv(tmp_path / "work2" / D.PLACEMENTS_FILE)
    assert listing2.placement.tolist() == listing.placement.tolist()[:4] and listing2.noise_set.sum() == 2
    # stages in another order, resumed: the noise set first, then the final campaign finds the 4 already stored
    again = D.build_dataset(pack["ckpt"], [], packs, tmp_path / "work2" / "db.sqlite", device="cpu", batch_size=8,
                            budget_s=600, noise=3, shared=3, placement_spec="structured:5,stratified:2,uniform:2",
                            progress=False, final_limit=4, stages=("noise", "final"))  # fmt: skip
    assert [s["stage"] for s in again["stages"]] == ["final/tasks-b", "final/tasks-a"]
    assert again["stages"][0]["evaluated"] == 1 and again["stages"][1]["skipped"] == 4  # 2 of 3 were stored
    with pytest.raises(PlacementSearchError, match="stages"):
        D.build_dataset(pack["ckpt"], [], packs, tmp_path / "work3" / "db.sqlite", device="cpu", stages=("all",))

    # the shipped tables: tidy, wide (final, set a; all-attention is the retention reference), noise; the loader
    from placement_search.evaluators.dataset import export_dataset, load_dataset

    ref = Placement.parse("attention,attention", space)
    campaign_db = tmp_path / "work" / "db.sqlite"
    run_campaign(pack["ckpt"], packs["tasks-a"], [ref], campaign_db, batch_size=8, progress=False)
    run_campaign(pack["ckpt"], packs["tasks-b"], [ref], campaign_db, batch_size=8, progress=False)
    paths = export_dataset(campaign_db, packs["tasks-a"], tmp_path / "tables", name="tiny",
                           placements_csv=tmp_path / "work" / D.PLACEMENTS_FILE, provenance={"run": record},
                           final_checkpoint="ckpt")  # fmt: skip
    long = load_dataset(paths["evaluations"])
    assert set(long.checkpoint) == {"ckpt", "supernet-step000007"} and set(long.sample_set) == {"a", "b"}
    assert long.groupby(["checkpoint", "sample_set", "placement", "task"]).primary.sum().eq(1).all()
    final = pd.read_csv(paths["final"], dtype={"placement": str})
    n_final = len(set(listing.placement) | {ref.code()})
    assert len(final) == n_final and final.set_index("placement").score[ref.code()] == pytest.approx(1.0)
    assert final.score.gt(0).all() and (final.sampler.fillna("") != "").sum() == 9
    noise = pd.read_csv(paths["noise"], dtype={"placement": str})
    n_noise = len(set(listing.placement[listing.noise_set]) | {ref.code()})
    assert len(noise) == n_noise and noise.score_a.notna().all() and noise.score_b.notna().all()
    meta = json.loads(paths["provenance"].read_text())
    assert meta["placements"]["ckpt/a"] == n_final and meta["noise"]["placements"] == n_noise
    with pytest.raises(Exception, match="no such dataset table"):
        load_dataset(tmp_path / "missing.csv.gz")
    # ranking stability of the snapshot against the final (here also the "shipped" table): JSON + Markdown
    assert D.stability_report(paths["evaluations"], paths["final"], tmp_path / "stab", final="ckpt") == 0
    stab = json.loads((tmp_path / "stab.json").read_text())
    rows = {r["checkpoint"]: r for r in stab["against_run_final"]}
    assert rows["shipped final"]["spearman"] == pytest.approx(1.0) and rows["shipped final"]["mean_abs_diff"] < 1e-6
    assert rows["supernet-step000007"]["placements"] == 3 and -1 <= rows["supernet-step000007"]["kendall"] <= 1
    assert "| supernet-step000007 | 3 |" in (tmp_path / "stab.md").read_text()
    with pytest.raises(PlacementSearchError, match="no final checkpoint"):
        D.stability_report(paths["evaluations"], paths["final"], tmp_path / "stab2")


def test_verify_presets_reports_and_extends_the_table(
    pack: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from placement_search.cli import main
    from placement_search.presets import (
        BatchPolicy,
        Conditions,
        Figures,
        Preset,
        PresetFile,
        Quality,
        Throughput,
        read_presets,
        write_presets,
    )
    from placement_search.verify import verify_presets

    spec = pack["model"].spec
    space = spec.search_space
    cond = Conditions(4096, BatchPolicy("max_fit"), "H200", 140.0)
    presets = [Preset(name, Placement.parse(code, space), level,
                      Figures(Quality("score", q, std=0.05), Throughput(1000.0 * level, speedup=level)), cond)
               for name, code, level, q in (("2x", "gdn,kda", 2.0, 0.9), ("3x", "sliding_window,gdn", 3.0, 0.8))]  # fmt: skip
    pfile = write_presets(PresetFile.create(spec, presets), tmp_path / "presets.json")
    table = tmp_path / "evals.csv"
    table.write_text("placement,sampler,score\nAA,structured,1.0\n\"gdn,kda\",uniform,0.5\n")
    res = verify_presets(pfile, pack["ckpt"], pack["tasks"], out=tmp_path / "v", evaluations=table, progress=False)
    rep = res.report.set_index("preset")
    assert list(rep.index) == ["2x", "3x"] and rep.measured_quality.gt(0).all()
    assert rep.z.to_dict() == pytest.approx(((rep.measured_quality - rep.predicted_quality) / 0.05).to_dict())
    assert rep.measured_tokens_per_s.isna().all()  # no --measure-throughput: quality only
    verified = read_presets(res.paths["presets"])
    assert verified["2x"].measured.quality.value == pytest.approx(rep.measured_quality["2x"])
    extended = pd.read_csv(res.paths["evaluations"], dtype=str)
    assert len(extended) == 3 and extended.sampler.tolist()[-1] == "verified"  # gdn,kda was already there
    assert float(extended.score.iloc[-1]) == pytest.approx(rep.measured_quality["3x"], rel=1e-6)
    # the CLI prints the comparison; --refit without a table is a one-line error
    assert main(["verify", str(pfile), "--checkpoint", str(pack["ckpt"]), "--tasks", str(pack["tasks"]),
                 "--out", str(tmp_path / "v2"), "--quiet"]) == 0  # fmt: skip
    assert "measured_quality" in capsys.readouterr().out
    assert main(["verify", str(pfile), "--checkpoint", str(pack["ckpt"]), "--tasks", str(pack["tasks"]),
                 "--refit"]) == 2  # fmt: skip
    assert "needs --evaluations" in capsys.readouterr().err


def test_dataset_commands(pack: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from placement_search.devnet.__main__ import main as devnet_main
    from placement_search.evaluators.dataset import load_dataset

    work, tables = tmp_path / "work", tmp_path / "tables"
    assert devnet_main(["dataset", "--supernet", str(pack["ckpt"]), "--devnet", str(pack["root"] / "corpus"),
                        "--work", str(work), "--device", "cpu", "--batch-size", "8", "--noise", "2", "--shared", "0",
                        "--placements", "structured:40,uniform:2", "--quiet"]) == 0  # fmt: skip
    speed = json.loads((work / "speed.json").read_text())
    assert speed["final_checkpoint"] == "ckpt" and speed["placements_per_second"] > 0
    assert speed["scored_tokens_per_placement"] > 0 and speed["fed_tokens_per_placement"] > 0
    assert devnet_main(["dataset-export", "--work", str(work), "--out", str(tables)]) == 0
    long = load_dataset(tables / "devnet-evaluations.csv.gz")
    final = pd.read_csv(tables / "devnet-final.csv", dtype={"placement": str})
    assert len(final) == long[long.sample_set == "a"].placement.nunique() == speed["placements_planned"]
    assert {"placement", "sampler", "score"} <= set(final.columns) and final.score.notna().all()
    # another run's tables beside the shipped ones (--name), and a bad stage list: one line, exit 2
    assert devnet_main(["dataset-export", "--work", str(work), "--out", str(tables), "--name", "run-b"]) == 0
    assert (tables / "run-b-final.csv").read_text() == (tables / "devnet-final.csv").read_text()
    # a recheck: the first 3 placements scored again into an empty database (the same packs), value by value
    import shutil

    again = tmp_path / "again"
    for name in ("tasks-a", "tasks-b"):
        shutil.copytree(work / name, again / name)
    assert devnet_main(["dataset", "--supernet", str(pack["ckpt"]), "--devnet", str(pack["root"] / "corpus"),
                        "--work", str(again), "--device", "cpu", "--batch-size", "8", "--noise", "0",
                        "--stages", "final", "--final-limit", "3", "--order-window", "3",
                        "--placements", "structured:40,uniform:2", "--quiet"]) == 0  # fmt: skip
    ref = tables / "devnet-evaluations.csv.gz"
    assert devnet_main(["recheck", "--work", str(again), "--reference", str(ref), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    cmp = report["comparison"]
    assert cmp["placements"] == 3 and cmp["values"] == cmp["bitwise_equal"] > 0 and cmp["unmatched"] == 0
    assert report["run"]["placements_planned"] == 3 and report["run"]["order_window"] == 3
    changed = load_dataset(ref)
    code = pd.read_csv(again / "placements.csv", dtype=str).placement.iloc[0]
    first = changed.index[(changed.placement == code) & (changed.checkpoint == "ckpt") & (changed.sample_set == "a")][0]
    changed.loc[first, "value"] = changed.loc[first, "value"] * (1 + 1e-9)
    changed.to_csv(tmp_path / "changed.csv.gz", index=False)
    assert devnet_main(["recheck", "--work", str(again), "--reference", str(tmp_path / "changed.csv.gz"),
                        "--out", str(tmp_path / "r2.json")]) == 1  # fmt: skip
    cmp2 = json.loads((tmp_path / "r2.json").read_text())["comparison"]
    assert cmp2["bitwise_equal"] == cmp["values"] - 1 and 0 < cmp2["max_rel_diff"] < 1e-8
    capsys.readouterr()
    changed.assign(checkpoint_hash="other").to_csv(tmp_path / "other.csv.gz", index=False)
    assert devnet_main(["recheck", "--work", str(again), "--reference", str(tmp_path / "other.csv.gz"),
                        "--out", str(tmp_path / "r3.json")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no row of the new scores" in err[0] and not (tmp_path / "r3.json").exists()
    assert devnet_main(["dataset", "--supernet", str(pack["ckpt"]), "--devnet", str(pack["root"] / "corpus"),
                        "--work", str(work), "--device", "cpu", "--stages", "final,everything", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "everything" in err[0]


def test_evaluate_cli_budget_and_resume(pack: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from placement_search.cli import main

    db = tmp_path / "e.sqlite"
    argv = ["evaluate", "--checkpoint", str(pack["ckpt"]), "--tasks", str(pack["tasks"]), "--sample", "uniform:3",
            "--db", str(db), "--batch-size", "4", "--share-contexts", "no", "--quiet"]  # fmt: skip
    assert main([*argv, "--max-minutes", "1e-9"]) == 0
    assert "evaluated 1 placements (0 already done, 2 left for a rerun)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "evaluated 2 placements (1 already done)" in capsys.readouterr().out
    assert main([*argv, "--max-minutes", "0"]) == 2
    assert "--max-minutes must be > 0" in capsys.readouterr().err
    assert main([*argv, "--order-window", "-1"]) == 2
    assert "--order-window must be >= 0" in capsys.readouterr().err
    # the per-layer schedule (CPU: eager steps), in code order: more placements, the same database
    argv2 = [a if a != "uniform:3" else "uniform:5" for a in argv]
    assert main([*argv2, "--cuda-graphs", "yes", "--order-window", "4", "--share-contexts", "no"]) == 0
    assert "evaluated 2 placements (3 already done)" in capsys.readouterr().out


def test_checkpoint_hash_is_the_content_and_rekey_moves_results(pack: dict, tmp_path: Path) -> None:
    from placement_search.evaluators.campaign import checkpoint_hash, rekey_checkpoint

    model = pack["model"]
    one, sharded, changed = tmp_path / "one", tmp_path / "sharded", tmp_path / "changed"
    save_checkpoint(model, one)
    save_checkpoint(model, sharded, max_shard_bytes=20_000)  # other files, other headers: the same weights
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert checkpoint_hash(one) == checkpoint_hash(sharded) == checkpoint_hash(pack["ckpt"])
    other = random_supernet(model.spec, seed=0)
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    save_checkpoint(other, changed)
    assert checkpoint_hash(changed) != checkpoint_hash(one)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(PlacementSearchError, match=r"model\.safetensors: not a safetensors file"):
        checkpoint_hash(tmp_path / "bad")
    # results stored under an old key move to the new one; a key present under both keeps the new row
    db = tmp_path / "r.sqlite"
    run_campaign(pack["ckpt"], pack["tasks"], ["gdn,kda", "attention,gdn"], db, batch_size=4, progress=False)
    new = checkpoint_hash(pack["ckpt"])
    with sqlite3.connect(db) as conn:
        for table in ("evaluations", "scores", "checkpoints"):
            conn.execute(f"UPDATE {table} SET checkpoint_hash = 'old'")
    run_campaign(pack["ckpt"], pack["tasks"], ["attention,gdn"], db, batch_size=4, progress=False)
    assert rekey_checkpoint(db, "old", new) > 0
    df = load_results(db)
    assert set(df.checkpoint_hash) == {new} and df.placement.nunique() == 2
    assert run_campaign(pack["ckpt"], pack["tasks"], ["gdn,kda", "attention,gdn"], db, batch_size=4,
                        progress=False).evaluated == 0  # fmt: skip


def test_layer_schedule_reuses_prefixes_and_matches_the_model(pack: dict, tmp_path: Path) -> None:
    from placement_search.evaluators.campaign import Campaign
    from placement_search.evaluators.graphs import GraphedPrefill

    model = random_supernet(pack["model"].spec, seed=3)  # 2 layers: reuse skips layer 0 when only layer 1 changes
    x = torch.randint(0, 300, (3, 17))
    runner = GraphedPrefill(model, [(3, 17)])
    assert runner.graphs is False and runner.num_graphs == 0
    with pytest.raises(PlacementSearchError, match="CUDA graphs need a CUDA model"):
        GraphedPrefill(model, graphs=True)
    with torch.no_grad():
        for placement in ("gdn,kda", "gdn,attention", "kda,attention", "kda,attention", "gdn,attention"):
            model.set_placement(placement)
            assert torch.equal(runner(x), model(x)), placement
    assert (runner.layers_skipped, runner.layers_run) == (1 + 2, 2 + 1 + 2 + 0 + 2)
    runner(x.clone())  # another input of the same shape: no reuse
    assert runner.layers_skipped == 3
    # states over the memory budget: two alternating buffers, the same logits, nothing skipped
    small = GraphedPrefill(model, [(3, 17)], max_state_bytes=1)
    with torch.no_grad():
        for placement in ("gdn,kda", "gdn,attention", "attention,attention"):
            model.set_placement(placement)
            assert torch.equal(small(x), model(x)), placement
    assert small.layers_skipped == 0 and small._runs[(3, 17)][0].shape[0] == 2
    # a campaign through the per-layer schedule (CPU: eager steps), pipelined and in code order, stores the same scores
    placements = ["kda,gdn", "attention,gdn", "attention,kda", "gdn,gdn", "attention,attention"]
    plain = Campaign(pack["ckpt"], pack["tasks"], tmp_path / "plain.sqlite", batch_size=4, share_contexts=False)
    plain.run(placements, progress=False)
    seen: list[str] = []
    layered = Campaign(pack["ckpt"], pack["tasks"], tmp_path / "layered.sqlite", batch_size=4, share_contexts=False,
                       cuda_graphs=True)  # fmt: skip
    summary = layered.run(placements, progress=False, order_window=3, on_placement=lambda i, p: seen.append(p.code()))
    assert summary.evaluated == 5 and layered.graph_check["ok"] and layered.graph_check["layers_skipped"] > 0
    assert seen[:3] == sorted(seen[:3]) and seen[3:] == sorted(seen[3:]) and len(set(seen)) == 5
    a, b = (load_results(tmp_path / f"{n}.sqlite").set_index(["placement", "task", "metric"]).value.sort_index()
            for n in ("plain", "layered"))  # fmt: skip
    assert a.index.equals(b.index)
    assert np.allclose(a.to_numpy(dtype=float), b.to_numpy(dtype=float), rtol=1e-9, atol=0, equal_nan=True)
    assert layered.graphs.layers_skipped > layered.graph_check["layers_skipped"]  # code-order neighbours share layer 0
