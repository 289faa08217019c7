"""``placement-search fit`` on small tables: the validation table, saving, and clean failures."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from placement_search import cli
from placement_search.errors import PlacementSearchError
from placement_search.placement import Placement
from placement_search.surrogate import load_surrogate
from placement_search.surrogate.datasets import additive_quality, default_space, make_synthetic_table

RUNNER = (
    "import sys; from placement_search import cli; "
    "cli.VERBS[:] = [v for v in cli.VERBS if v.endswith('.fit')] or ['placement_search.cli.fit']; "
    "sys.exit(cli.main(sys.argv[1:]))"
)


@pytest.fixture
def fit_only(monkeypatch):
    """Only the fit verb, so these tests do not depend on the other verbs' modules."""
    monkeypatch.setattr(cli, "VERBS", ["placement_search.cli.fit"])


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    quality = additive_quality(default_space(48), seed=0, noise_std=0.1)
    frame = make_synthetic_table(quality, {"uniform": 90, "stratified": 30, "structured": 30}, seed=0)
    path = tmp_path_factory.mktemp("fit") / "evals.csv"
    frame.drop(columns=["true_score"]).to_csv(path, index=False)
    return path


def test_fit_prints_validation_table_and_saves(fit_only, table_path, tmp_path, capsys):
    out = tmp_path / "model"
    code = cli.main(["fit", str(table_path), "--surrogate", "ridge", "--cv", "3", "--out", str(out), "--calibration"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[:5] == ["model", "split", "folds", "n_train", "n_test"]
    for column in ("r2", "spearman", "kendall", "precision@top10%[mean]"):
        assert column in lines[0]
    assert any(line.split()[1] == "ood:structured" for line in lines[1:4])
    assert "interval coverage" in captured.out
    model = load_surrogate(out)
    assert model.manifest_["extra"]["surrogate"] == "ridge"
    assert model.manifest_["training"]["n_samples"] == 150
    assert model.predict(np.eye(4)[np.zeros(48, dtype=int)].reshape(1, -1)).shape == (1,)


def test_fit_names_and_tune(fit_only, tmp_path, capsys):
    quality = additive_quality(default_space(48), seed=1)
    frame = make_synthetic_table(quality, {"uniform": 40}, seed=0)
    frame["placement"] = [
        ",".join(dict(A="attention", S="swa", G="gdn", K="kda")[c] for c in code) for code in frame["placement"]
    ]
    path = tmp_path / "names.csv"
    frame.drop(columns=["speed", "true_score"]).rename(columns={"score": "acc"}).to_csv(path, index=False)
    code = cli.main(["fit", str(path), "--target", "acc", "--surrogate", "ridge", "--cv", "2", "--tune",
                     "--trials", "2", "--inner-cv", "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "nested" in captured.out and captured.err == ""


def _write_edited(table_path, tmp_path, edit):
    rows = list(csv.reader(table_path.open()))
    edit(rows)
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return bad


@pytest.mark.parametrize(
    ("edit", "args", "match"),
    [
        (lambda rows: rows[3].__setitem__(0, rows[3][0][:10] + "X" + rows[3][0][11:]), [], "row 3: .*'X'"),
        (lambda rows: rows[5].__setitem__(1, "abc"), [], "row 5: target column 'score': 'abc' is not a number"),
        (lambda rows: rows[4].__setitem__(1, ""), [], "row 4: target column 'score': is empty"),
        (lambda rows: rows[2].__setitem__(0, "attention,foo" + ",gdn" * 46), [], "row 2: layer 1: unknown mixer 'foo'"),
        (lambda rows: rows[2].__setitem__(0, "AAA"), [], "row 2: placement code has 3 layers, expected 48"),
        (lambda rows: None, ["--target", "quality"], "no column 'quality'"),
        (lambda rows: None, ["--speed-column", "latency"], "no column 'latency'"),
        (lambda rows: rows.__setitem__(slice(2, None), []), [], "fewer than the 5 CV folds"),
        (lambda rows: None, ["--surrogate", "forest"], "unknown surrogate 'forest'"),
    ],
)
def test_fit_bad_input_exits_2_with_one_line(fit_only, table_path, tmp_path, capsys, edit, args, match):
    bad = _write_edited(table_path, tmp_path, edit)
    assert cli.main(["fit", str(bad), "--surrogate", "ridge", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("placement-search fit: error: ")
    assert re.search(match, lines[0]), lines[0]


def test_fit_bad_input_in_a_subprocess_has_no_traceback(table_path, tmp_path):
    bad = _write_edited(table_path, tmp_path, lambda rows: rows[5].__setitem__(1, "abc"))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "fit", str(bad), "--surrogate", "ridge"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "row 5" in proc.stderr


def test_fit_missing_file(fit_only, tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


COST_TABLE = Path(__file__).resolve().parents[1] / "results" / "cost_tables" / "super-apriel-15b_h200.json"


def test_cost_table_speed_ranks_placements_by_predicted_throughput():
    from placement_search.spec import DEFAULT_SPEC, get_spec
    from placement_search.surrogate.table import cost_table_speed
    from placement_search.surrogate.validation import speed_buckets

    spec = get_spec(DEFAULT_SPEC)
    space = spec.search_space
    placements = [Placement([m] * 48, space) for m in ("attention", "sliding_window", "gdn", "kda")]
    placements.append(Placement(["attention"] * 12 + ["gdn"] * 36, space))
    cost = cost_table_speed(placements + placements[:1], COST_TABLE, spec=spec, context=32768, batch_policy="max_fit")
    speed = cost.speed
    assert speed[0] == speed[-1] and speed[2] > speed[4] > speed[0]  # all-GDN > 12 attention > all-attention
    assert "super-apriel-15b_h200.json" in cost.describe() and "context 32768" in cost.describe()
    assert speed_buckets(speed, 2)[0] == 0 and speed_buckets(speed, 2)[2] == 1
    with pytest.raises(PlacementSearchError, match="context"):
        cost_table_speed(placements, COST_TABLE, spec=spec, context=10**7)


def test_fit_with_cost_table_buckets(fit_only, table_path, capsys):
    code = cli.main(["fit", str(table_path), "--surrogate", "ridge", "--cv", "3", "--cost-table", str(COST_TABLE),
                     "--context", "32768", "--batch-policy", "max_fit"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "speed buckets from predicted decode tokens/s from cost table super-apriel-15b_h200.json" in captured.err
    assert "precision@top10%[3]" in captured.out.splitlines()[0]
    both = ["fit", str(table_path), "--cost-table", str(COST_TABLE), "--speed-column", "speed"]
    assert cli.main(both) == 2 and "not both" in capsys.readouterr().err
    assert cli.main(["fit", str(table_path), "--cost-table", str(table_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
