"""``placement-search optimize`` end to end on small synthetic tables, the dp solver, and its error paths."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from placement_search.cli import main
from placement_search.constraints import Constraints
from placement_search.optimize import optimize
from placement_search.pareto import pareto_mask
from placement_search.placement import Placement
from placement_search.presets import read_presets
from placement_search.spec import DEFAULT_SPEC, get_spec
from placement_search.surrogate.datasets import make_synthetic_table, pairwise_quality


@pytest.fixture(scope="module")
def table_path(tmp_path_factory) -> str:
    space = get_spec(DEFAULT_SPEC).search_space
    frame = make_synthetic_table(pairwise_quality(space, seed=3), {"uniform": 250, "stratified": 100,
                                                                   "structured": 50}, seed=3)
    path = tmp_path_factory.mktemp("opt") / "evals.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_optimize_writes_presets_csv_and_png(table_path, tmp_path) -> None:
    res = optimize(table_path, trials=300, out=tmp_path, progress=False, polish_time_s=2.0, levels="1.5,2,3,5")
    presets = read_presets(tmp_path / "presets.json")
    assert [p.name for p in presets.presets] == [f"{lv:g}x" for lv in res.presets["level"]]
    for p in presets.presets:
        assert p.predicted.throughput.speedup >= p.speed_level
        assert p.conditions.context_length == 32768 and p.conditions.batch_policy.kind == "max_fit"
    prov = presets.provenance
    assert len(prov["data"][0]["sha256"]) == 64 and prov["surrogate"]["name"] == "ensemble-xgb-counts"
    assert prov["cost_model"]["table"].endswith("super-apriel-15b_h200.json")
    front = pd.read_csv(tmp_path / "front.csv")
    assert {"placement", "quality", "tokens_per_s", "speedup"} <= set(front.columns)
    assert pareto_mask(front[["quality", "tokens_per_s"]].to_numpy()).all()
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_constraints_honoured(table_path, tmp_path) -> None:
    space = get_spec(DEFAULT_SPEC).search_space
    items = ["attention>=2", "0=gdn", "47!=kda"]
    res = optimize(table_path, trials=200, out=tmp_path, progress=False, polish_time_s=2.0, constraints=items,
                   no_single=["sliding_window"], levels="1.5,2")
    cons = Constraints.parse(items, space, no_single=["sliding_window"])
    for code in res.front["placement"]:
        assert cons.satisfied(Placement.parse(code, space)), code


def test_dp_solver_on_full_space_and_fixed_batch(table_path, tmp_path) -> None:
    res = optimize(table_path, solver="dp", surrogate="ridge", batch_policy="fixed:16", out=tmp_path,
                   progress=False, levels="1.2", constraints=["kda<=40"])
    assert len(res.front) > 5 and (res.front["n_kda"] <= 40).all()
    assert (np.diff(res.front["tokens_per_s"]) > 0).all() and (np.diff(res.front["quality"]) < 0).all()


def test_dp_equals_brute_force_on_a_tiny_space() -> None:
    from placement_search.exact_front import evaluate, exact_front_by_counts
    from placement_search.placement import SearchSpace
    from placement_search.search import count_violation

    space = SearchSpace.uniform(5, ("attention", "sliding_window", "gdn", "kda"))
    rng = np.random.default_rng(0)
    unary, pair = rng.normal(size=(5, 4)), {1: rng.normal(size=(4, 4, 4)), 2: rng.normal(size=(3, 4, 4))}
    cons = Constraints.parse(["attention<=3"], space, no_single=["kda"])

    def speed(counts):  # nonlinear in the counts; count constraints as infeasible counts (what optimize does)
        row = np.array([[counts[m] for m in space.mixers]])
        if count_violation(row, cons, space.mixers)[0] > 0:
            return float("nan")
        return 10.0 / (1 + counts["attention"]) ** 2 + 0.3 * counts["gdn"]

    front = exact_front_by_counts(space, unary, speed, pair)
    idx = np.array(list(itertools.product(range(4), repeat=5)))
    q, _ = evaluate(idx, unary, pair, 0.0, np.zeros((5, 4)))
    sp = np.array([speed({m: int((r == j).sum()) for j, m in enumerate(space.mixers)}) for r in idx])
    ok = ~np.isnan(sp)
    mask = pareto_mask(np.stack([q[ok], sp[ok]], 1))
    assert sorted(zip(np.round(sp[ok][mask], 9), np.round(q[ok][mask], 9), strict=True)) == sorted(
        zip(np.round(front.speed, 9), np.round(front.quality, 9), strict=True))


def test_dp_needs_an_expansion_surrogate(table_path, tmp_path, capsys) -> None:
    code = main(["optimize", "--evaluations", table_path, "--solver", "dp", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "linear or cluster-expansion" in err[0]


def test_no_arguments_without_shipped_table_exits_2(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PLACEMENT_SEARCH_EVALUATIONS", str(tmp_path / "absent.csv"))
    assert main(["optimize"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent.csv" in err[0] and "--evaluations" in err[0]


def test_no_arguments_runs_the_shipped_default(tmp_path, capsys, monkeypatch) -> None:
    """The README's main job as shipped: dev-supernet evaluations, the 15B H200 table at 32K, max_fit, the default
    surrogate (an ensemble: presets carry an uncertainty) and trial budget. Its wall time is a benchmark figure
    (README), not checked here."""
    monkeypatch.delenv("PLACEMENT_SEARCH_EVALUATIONS", raising=False)
    assert main(["optimize", "--out", str(tmp_path), "--quiet"]) == 0
    assert "presets:" in capsys.readouterr().out
    doc = read_presets(tmp_path / "presets.json")
    assert doc.provenance["data"][0]["path"].endswith("results/evaluations/devnet-final.csv")
    assert [p.speed_level for p in doc.presets] == [1.5, 2.0, 3.0, 5.0, 7.0, 10.0]
    for p in doc.presets:
        assert p.predicted.throughput.speedup >= p.speed_level and p.conditions.context_length == 32768
        assert p.predicted.quality.std is not None and 0 < p.predicted.quality.std < 0.2
    front = pd.read_csv(tmp_path / "front.csv").sort_values("tokens_per_s")
    assert len(front) > 20 and front.quality.is_monotonic_decreasing  # a front: faster rows lose quality
    assert (tmp_path / "front.png").stat().st_size > 10_000


def test_shipped_default_used_when_present(table_path, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("PLACEMENT_SEARCH_EVALUATIONS", table_path)
    assert main(["optimize", "--trials", "100", "--out", str(tmp_path), "--quiet", "--levels", "1.5"]) == 0
    assert "presets:" in capsys.readouterr().out
    assert read_presets(tmp_path / "presets.json").provenance["data"][0]["path"] == table_path


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--evaluations", "/nonexistent/evals.csv"], "no such file"),
        (["--levels", "fast"], "comma-separated numbers"),
        (["--constraint", "attention>>2"], "cannot read constraint"),
        (["--trials", "0"], "at least 1"),
    ],
)
def test_bad_arguments_exit_2(argv, needle, table_path, tmp_path, capsys) -> None:
    if "--evaluations" not in argv:
        argv = ["--evaluations", table_path, *argv]
    assert main(["optimize", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
