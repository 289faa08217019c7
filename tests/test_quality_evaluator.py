"""Quality evaluator: lm-eval model class, task pack, quality score, campaign runner, CLI (tiny CPU model)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from conftest import runtime_tiny_config  # noqa: E402

from placement_search.devnet.config import CorpusSettings  # noqa: E402
from placement_search.devnet.corpus import Corpus, SourceFile, build_corpus  # noqa: E402
from placement_search.devnet.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
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
