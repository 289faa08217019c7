"""Constraints, the Optuna search loop and preset choice, on small known-answer problems."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from placement_search.constraints import ConstraintError, Constraints
from placement_search.exact_front import evaluate, exact_front
from placement_search.pareto import hypervolume
from placement_search.placement import Placement, SearchSpace
from placement_search.search import choose_presets, run_search

MIXERS = ("attention", "sliding_window", "gdn", "kda")


def test_constraints_parse_and_check() -> None:
    space = SearchSpace.uniform(8, MIXERS)
    c = Constraints.parse(["A>=2", "attention<=4", "0=attention", "7!=swa", "gdn==3"], space, no_single=["kda"])
    assert c.min_count == {"attention": 2, "gdn": 3} and c.max_count == {"attention": 4, "gdn": 3}
    assert c.pinned == {0: "attention"} and c.forbidden == {7: frozenset({"sliding_window"})}
    restricted = c.restrict(space)
    assert restricted.allowed_at(0) == ("attention",) and "sliding_window" not in restricted.allowed_at(7)
    assert c.satisfied(Placement.parse("AAGGGAKK", space))
    assert not c.satisfied(Placement.parse("AAGGGAKS", space))  # one kda layer, and layer 7 = swa
    v = c.violations(Placement.parse("KKGGGKKS", space))
    assert v["attention>=2"] == 2 and v["pinned"] == 1 and v["forbidden"] == 1
    assert Constraints.parse(c.describe()[:-1], space, no_single=["kda"]) == c


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["mamba>=2"], "unknown mixer 'mamba'"),
        (["attention>>2"], "cannot read constraint"),
        (["9=attention"], "layer 9 is beyond the last (7)"),
        (["0=attention", "0=gdn"], "already pinned"),
        (["0=gdn", "0!=gdn"], "layer 0: every mixer"),
        (["attention>=5", "attention<=4"], "cannot both hold"),
        (["attention>=5", "gdn>=5"], "add up to 10 layers"),
    ],
)
def test_constraint_errors(items, needle) -> None:
    with pytest.raises(ConstraintError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Constraints.parse(items, SearchSpace.uniform(8, MIXERS))


def small_problem(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    space = SearchSpace.uniform(n, MIXERS)
    unary = rng.normal(size=(n, 4))
    pair = {1: 0.5 * rng.normal(size=(n - 1, 4, 4))}
    per_mixer = np.array([4.0, 1.5, 1.0, 1.2])
    cost = np.tile(per_mixer, (n, 1))

    def quality(ps):
        return evaluate(np.stack([p.indices() for p in ps]), unary, pair, 0.0, cost)[0], np.full(len(ps), 0.1)

    def speed(ps):
        return 100.0 / (1.0 + evaluate(np.stack([p.indices() for p in ps]), unary, pair, 0.0, cost)[1])

    return space, unary, pair, cost, quality, speed


def test_nsga2_finds_the_exact_front_of_a_small_space() -> None:
    space, unary, pair, cost, quality, speed = small_problem()
    res = run_search(space, quality, speed, n_trials=2000, population_size=50, seed=1, progress=False,
                     seeds=[Placement.uniform(m, space) for m in MIXERS])
    exact = exact_front(space, unary, cost, pair, bins=int((cost.max(1) - cost.min(1)).sum() * 2) + 1)
    ref = (float(exact.quality.min()) - 1.0, 0.0)
    hv_exact = hypervolume(np.stack([exact.quality, 100.0 / (1.0 + exact.cost)], 1), ref)
    assert res.hypervolume(ref) / hv_exact > 0.995
    assert set(res.front.columns) >= {"placement", "quality", "quality_std", "tokens_per_s", "n_attention"}


def test_constraints_are_respected_by_the_front() -> None:
    space, _, _, _, quality, speed = small_problem()
    c = Constraints.parse(["attention>=2", "5=gdn"], space, no_single=["kda"])
    res = run_search(space, quality, speed, constraints=c, n_trials=1500, population_size=50, seed=0, progress=False)
    assert len(res.front) > 0
    for code in res.front["placement"]:
        p = Placement.parse(code, space)
        assert c.satisfied(p), code


def test_unfit_placements_are_infeasible() -> None:
    space, _, _, _, quality, _ = small_problem()

    def speed(ps):  # anything with attention on layer 0 "does not fit"
        return np.array([np.nan if p[0] == "attention" else 10.0 + p.counts()["gdn"] for p in ps])

    res = run_search(space, quality, speed, n_trials=600, population_size=50, seed=0, progress=False)
    assert all(not code.startswith("A") for code in res.front["placement"])


def test_resume_from_storage(tmp_path) -> None:
    space, _, _, _, quality, speed = small_problem()
    import optuna

    def storage():  # a journal file: what a resumed run reopens (SQLite works the same, ~5x slower per trial)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.log")))

    def complete(study):
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    first = run_search(space, quality, speed, n_trials=50, population_size=25, storage=storage(), study_name="s",
                       progress=False)
    assert complete(first.study) == 50
    second = run_search(space, quality, speed, n_trials=50, population_size=25, storage=storage(), study_name="s",
                        progress=False)
    assert complete(second.study) == 100 and second.trials == 50


def test_choose_presets_levels_and_ties() -> None:
    front = pd.DataFrame({
        "placement": ["a", "b", "c", "d", "e"],
        "quality": [0.95, 0.90, 0.90, 0.80, 0.70],
        "quality_std": [0.01, 0.05, 0.02, 0.01, 0.01],
        "speedup": [1.0, 2.1, 2.5, 3.5, 6.0],
    })
    picks = choose_presets(front, levels=[1.5, 2.0, 3.0, 5.0, 10.0])
    assert picks["level"].tolist() == [1.5, 2.0, 3.0, 5.0]
    # 1.5x and 2x: b and c tie at 0.90, c is more certain
    assert picks["placement"].tolist() == ["c", "c", "d", "e"]
    loose = choose_presets(front, levels=[2.0], tie_tolerance=0.2)
    assert loose["placement"].tolist() == ["d"]  # 0.80 within 0.2 of 0.90 and std 0.01 < 0.02


def test_every_small_front_point_is_reachable() -> None:
    # sanity of the helper problem: the exact front equals brute force
    space, unary, pair, cost, _, _ = small_problem(4, 3)
    idx = np.array(list(itertools.product(range(4), repeat=4)))
    q, _ = evaluate(idx, unary, pair, 0.0, cost)
    exact = exact_front(space, unary, cost, pair, bins=int((cost.max(1) - cost.min(1)).sum() * 2) + 1)
    assert np.isclose(exact.quality.max(), q.max())
