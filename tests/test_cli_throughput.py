"""``placement-search throughput``: predictions from a small table written here, one-line errors, exit 2."""

from __future__ import annotations

import json

import pytest

from placement_search.cli import main
from placement_search.cli.throughput import default_table
from placement_search.evaluators.memory import GiB, RuntimeOverheads, max_batch
from placement_search.spec import get_spec

MIXERS = ("attention", "sliding_window", "gdn", "kda")
BATCHES = [1, 16, 256, 2048]


def write_table(path, spec) -> None:
    """Linear synthetic costs at contexts 4K and 32K."""

    def cost(m: str, c: int, b: int) -> float:
        per = {"attention": c * 1e-6, "sliding_window": 4e-3, "gdn": 5e-4, "kda": 6e-4}[m]
        return 0.4 + per * b

    data = {
        "format": "placement-search/cost-table",
        "format_version": 1,
        "model": {"name": spec.name, "config_hash": spec.config_hash, "num_layers": 48, "mixers": list(MIXERS)},
        "gpu": "Tiny GPU",
        "device_memory_gib": 139.8,
        "contexts": [4096, 32768],
        "head_ms": {"batches": BATCHES, "ms": [0.4 + 1e-3 * b for b in BATCHES]},
        "shared_layer_ms": {"batches": BATCHES, "ms": [0.15] * 4},
        "layer_ms": {m: {str(c): {"batches": BATCHES, "ms": [cost(m, c, b) for b in BATCHES]} for c in (4096, 32768)}
                     for m in MIXERS},
        "memory": RuntimeOverheads().to_dict(),
        "idealized": {"layer_ms": dict.fromkeys(MIXERS, 0.5)},
        "provenance": {"command": "test"},
    }
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def spec():
    return get_spec("super-apriel-15b")


@pytest.fixture
def table(tmp_path, spec):
    path = tmp_path / "table.json"
    write_table(path, spec)
    return str(path)


def test_predict_fixed_batch(table, capsys):
    code = main(["throughput", "A" * 24 + "G" * 24, "--context", "32768", "--batch-policy", "fixed:16",
                 "--table", table])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    first, second = out.out.strip().split("\n")
    step = 0.4 + 16e-3 + 24 * (0.4 + 32768e-6 * 16) + 24 * (0.4 + 5e-4 * 16)
    assert f"at batch 16, step {step:.3f} ms" in first
    assert f"{16 / step * 1e3:,.1f} tokens/s" in first
    assert "context 32768, fixed:16, 139.8 GiB, Tiny GPU" in first
    assert second.startswith("memory: weights ")


def test_predict_max_fit_json(table, capsys, spec):
    p = "A" * 4 + "K" * 44
    code = main(["throughput", p, "--context", "4096", "--batch-policy", "max_fit:200", "--memory-gib", "100",
                 "--table", table, "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    want = min(200, max_batch(spec, ["attention"] * 4 + ["kda"] * 44, 4096, 100 * GiB))
    assert data["throughput"]["batch"] == want
    assert data["conditions"] == {
        "context_length": 4096,
        "batch_policy": {"kind": "max_fit", "cap": 200},
        "gpu": "Tiny GPU",
        "memory_budget_gib": 100.0,
        "dtype": "bfloat16",
    }
    assert data["counts"] == {"attention": 4, "sliding_window": 0, "gdn": 0, "kda": 44}
    assert data["throughput"]["speedup"] > 1
    assert data["table"] == table


def test_idealized_variant(table, capsys):
    code = main(["throughput", "S" * 48, "--context", "4096", "--batch-policy", "fixed:1", "--table", table,
                 "--variant", "idealized"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "step 24.000 ms" in out.out and "[predicted (idealized)]" in out.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", "65536"], "context 65536 is outside the table's grid"),
        (["--context", "0"], "--context must be a positive"),
        (["--batch-policy", "sometimes"], "batch policy 'sometimes'"),
        (["--batch-policy", "fixed:4096"], "more than the 139.8 GiB budget"),
        (["--batch-policy", "max_fit", "--memory-gib", "20"], "not even one sequence fits 20.0 GiB"),
        (["--memory-gib", "-3"], "--memory-gib must be positive"),
        (["--variant", "regression"], "no regression fitted"),
    ],
)
def test_one_line_errors(table, capsys, args, message):
    code = main(["throughput", "A" * 48, "--table", table, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("placement-search throughput: error: ")


def test_bad_placement_and_tables(tmp_path, table, capsys):
    assert main(["throughput", "A" * 47, "--table", table]) == 2
    assert "47 layers" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "placement-search/cost-table", "format_version": 1}))
    assert main(["throughput", "A" * 48, "--table", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "missing key 'model'" in err and err.count("\n") == 1
    assert main(["throughput", "A" * 48, "--table", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_measure_without_gpu(table, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["throughput", "A" * 48, "--measure"]) == 2
    err = capsys.readouterr().err
    assert "--measure needs a CUDA GPU" in err and err.count("\n") == 1


def test_default_table(capsys, monkeypatch, tmp_path, spec):
    path = tmp_path / "default.json"
    write_table(path, spec)
    monkeypatch.setenv("PLACEMENT_SEARCH_COST_TABLE", str(path))
    assert default_table("super-apriel-15b") == path
    assert main(["throughput", "G" * 48, "--context", "4096", "--batch-policy", "fixed:2"]) == 0
    assert "Tiny GPU" in capsys.readouterr().out
    monkeypatch.setenv("PLACEMENT_SEARCH_COST_TABLE", str(tmp_path / "missing.json"))
    assert main(["throughput", "G" * 48]) == 2
    assert "no shipped cost table" in capsys.readouterr().err


def test_shipped_table(capsys):
    """The shipped H200 table answers for a 15B placement (skipped until the table is in results/)."""
    path = default_table("super-apriel-15b")
    if not path.exists():
        pytest.skip(f"{path} not shipped yet")
    code = main(["throughput", "attention*12,gdn*36", "--context", "32768", "--batch-policy", "max_fit"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "NVIDIA H200" in out.out and "tokens/s" in out.out
