"""Cost tables: arithmetic, interpolation, policies, variants, loading and rejecting malformed tables."""

from __future__ import annotations

import copy
import json

import pytest

from placement_search.evaluators.cost_model import (
    CostModelError,
    CostTable,
    Curve,
    batch_grid,
    build_table,
    context_independent,
    fit_regression,
)
from placement_search.evaluators.memory import GiB, RuntimeOverheads, max_batch
from placement_search.presets import BatchPolicy
from placement_search.spec import get_spec

N = 48
MIXERS = ("attention", "sliding_window", "gdn", "kda")
CONTEXTS = (4096, 32768)
BATCHES = [1, 8, 64, 1024]


def layer_cost(mixer: str, context: int, batch: int) -> float:
    """A synthetic cost, linear in batch (and in context for attention)."""
    base = {"attention": 0.10, "sliding_window": 0.10, "gdn": 0.12, "kda": 0.13}[mixer]
    per_seq = {"attention": 1e-6 * context, "sliding_window": 1e-6 * 4096, "gdn": 5e-4, "kda": 5e-4}[mixer]
    return 0.30 + base + per_seq * batch


def head_cost(batch: int) -> float:
    return 0.35 + 0.002 * batch


@pytest.fixture(scope="module")
def spec():
    return get_spec("super-apriel-15b")


def table_dict(spec) -> dict:
    return {
        "format": "placement-search/cost-table",
        "format_version": 1,
        "model": {"name": spec.name, "config_hash": spec.config_hash, "num_layers": N, "mixers": list(MIXERS)},
        "gpu": "Test GPU",
        "device_memory_gib": 139.8,
        "dtype": "bfloat16",
        "contexts": list(CONTEXTS),
        "head_ms": {"batches": BATCHES, "ms": [head_cost(b) for b in BATCHES]},
        "shared_layer_ms": {"batches": BATCHES, "ms": [0.3 + 1e-5 * b for b in BATCHES]},
        "layer_ms": {
            m: {str(c): {"batches": BATCHES, "ms": [layer_cost(m, c, b) for b in BATCHES]} for c in CONTEXTS}
            for m in MIXERS
        },
        "memory": RuntimeOverheads().to_dict(),
        "idealized": {"layer_ms": {"attention": 0.5, "sliding_window": 0.4, "gdn": 0.42, "kda": 0.43}},
        "regression": [
            {"context": 32768, "batch_policy": "fixed:8", "memory_budget_gib": 139.8,
             "coef_ms": {"attention": 0.6, "sliding_window": 0.45, "gdn": 0.44, "kda": 0.45}, "n": 10}
        ],
        "provenance": {"command": "test", "date": "2026-11-28"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def table(spec) -> CostTable:
    return CostTable.from_dict(table_dict(spec), source="synthetic.json")


def test_batch_grid():
    assert batch_grid(1) == [1]
    assert batch_grid(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    assert batch_grid(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    g = batch_grid(1217)
    assert g[-1] == 1217 and g[-2] == 1024 and g == sorted(set(g))
    assert batch_grid(0) == []


def test_curve_interpolation():
    c = Curve((1, 3, 7), (1.0, 2.0, 4.0))
    assert c.at(1) == 1.0 and c.at(3) == 2.0 and c.at(7) == 4.0
    assert c.at(2) == pytest.approx(1.5)
    assert c.at(5) == pytest.approx(3.0)
    with pytest.raises(CostModelError, match=r"batch 8 is outside the measured grid of curve \(1\.\.7\)"):
        c.at(8)
    with pytest.raises(CostModelError):
        c.at(0.5)
    assert Curve((4,), (2.0,)).at(4) == 2.0


def test_table_arithmetic_on_grid(table, spec):
    p = ["attention"] * 12 + ["sliding_window"] * 12 + ["gdn"] * 12 + ["kda"] * 12
    for c in CONTEXTS:
        for b in BATCHES:
            want = head_cost(b) + sum(layer_cost(m, c, b) for m in p)
            assert table.step_ms(p, c, b) == pytest.approx(want, rel=1e-12)
    assert table.mixer_ms("gdn", 4096, 8) == pytest.approx(layer_cost("gdn", 4096, 8) - (0.3 + 8e-5))


def test_interpolation_linear_in_batch_and_context(table):
    # the synthetic costs are linear in B and L, so interpolation is exact between grid points
    for m in MIXERS:
        for c in (4096, 10000, 20000, 32768):
            for b in (1, 5, 30, 500, 1024):
                assert table.layer_ms(m, c, b) == pytest.approx(layer_cost(m, c, b), rel=1e-9)


def test_refuses_outside_the_grid(table):
    p = ["gdn"] * N
    with pytest.raises(CostModelError, match="context 65536 is outside the table's grid") as e:
        table.step_ms(p, 65536, 8)
    assert "\n" not in str(e.value)
    with pytest.raises(CostModelError, match="context 2048 is outside"):
        table.step_ms(p, 2048, 8)
    with pytest.raises(CostModelError, match="batch 2000 is outside the measured grid"):
        table.step_ms(p, 4096, 2000)
    with pytest.raises(CostModelError, match="47 layers"):
        table.step_ms(p[:47], 4096, 8)
    with pytest.raises(CostModelError, match="no costs for mixer 'mamba'"):
        table.layer_ms("mamba", 4096, 8)


def test_fixed_policy_prediction(table, spec):
    pred = table.predict("G" * 48, 32768, "fixed:8")
    assert pred.batch == 8
    assert pred.step_ms == pytest.approx(head_cost(8) + 48 * layer_cost("gdn", 32768, 8))
    assert pred.tokens_per_s == pytest.approx(8 / pred.step_ms * 1e3)
    cond = pred.conditions.to_dict()
    assert cond == {
        "context_length": 32768,
        "batch_policy": {"kind": "fixed", "batch": 8},
        "gpu": "Test GPU",
        "memory_budget_gib": 139.8,
        "dtype": "bfloat16",
    }
    thr = pred.throughput
    assert thr.batch == 8 and thr.step_time_ms == pytest.approx(pred.step_ms, abs=1e-4)
    all_att = table.predict("A" * 48, 32768, "fixed:8", speedup=False)
    assert pred.speedup == pytest.approx(pred.tokens_per_s / all_att.tokens_per_s, rel=1e-6)
    summary = pred.summary()
    assert "\n" not in summary and "batch 8" in summary and "fixed:8" in summary and "Test GPU" in summary


def test_max_fit_policy_uses_the_memory_model(table, spec):
    p = ["attention"] * 8 + ["gdn"] * 40
    pred = table.predict(p, 32768, BatchPolicy("max_fit"), 100.0)
    assert pred.batch == max_batch(spec, p, 32768, 100 * GiB, overheads=table.overheads)
    assert pred.memory.total <= 100 * GiB
    assert pred.memory_budget_gib == 100.0
    capped = table.predict(p, 32768, "max_fit:16", 100.0)
    assert capped.batch == 16 and str(capped.policy) == "max_fit:16"
    # default budget: the GPU's memory recorded in the table
    default = table.predict(p, 32768, "max_fit")
    assert default.memory_budget_gib == 139.8 and default.batch > pred.batch
    # larger context: fewer sequences fit, so the batch drops
    assert table.predict(["attention"] * N, 4096, "max_fit").batch > table.predict(["attention"] * N, 32768, "max_fit").batch


def test_policy_errors(table):
    with pytest.raises(CostModelError, match=r"needs .* GiB, more than the 60\.0 GiB budget"):
        table.predict("A" * 48, 32768, "fixed:64", 60.0)
    with pytest.raises(CostModelError, match=r"not even one sequence fits 30\.0 GiB"):
        table.predict("A" * 48, 32768, "max_fit", 30.0)
    with pytest.raises(CostModelError, match="memory budget must be positive"):
        table.predict("A" * 48, 32768, "max_fit", 0.0)


def test_idealized_and_regression_variants(table):
    p = "A" * 12 + "S" * 12 + "G" * 12 + "K" * 12
    ideal = table.predict(p, 32768, "fixed:8", variant="idealized")
    assert ideal.step_ms == pytest.approx(12 * (0.5 + 0.4 + 0.42 + 0.43))
    # the idealized constants ignore the context
    assert table.predict(p, 4096, "fixed:8", variant="idealized").step_ms == ideal.step_ms
    reg = table.predict(p, 32768, "fixed:8", 139.8, variant="regression")
    assert reg.step_ms == pytest.approx(12 * (0.6 + 0.45 + 0.44 + 0.45))
    with pytest.raises(CostModelError, match="no regression fitted for context 4096"):
        table.predict(p, 4096, "fixed:8", variant="regression")
    with pytest.raises(CostModelError, match="unknown variant"):
        table.predict(p, 4096, "fixed:8", variant="magic")


def test_fit_regression_recovers_coefficients():
    coef = {"attention": 0.7, "sliding_window": 0.4, "gdn": 0.45, "kda": 0.5}
    rows = []
    for counts in ([48, 0, 0, 0], [0, 48, 0, 0], [10, 10, 14, 14], [1, 20, 20, 7], [5, 5, 30, 8]):
        c = dict(zip(MIXERS, counts, strict=True))
        rows.append((c, sum(coef[m] * n for m, n in c.items())))
    got, rmse = fit_regression(rows, MIXERS)
    for m in MIXERS:
        assert got[m] == pytest.approx(coef[m], rel=1e-9)
    assert rmse < 1e-9
    with pytest.raises(CostModelError):
        fit_regression([], MIXERS)


def test_save_load_round_trip(table, tmp_path):
    path = tmp_path / "t.json"
    table.save(path)
    again = CostTable.load(path)
    p = ["kda"] * 20 + ["sliding_window"] * 28
    assert again.step_ms(p, 20000, 100) == pytest.approx(table.step_ms(p, 20000, 100))
    assert again.regression == table.regression
    assert again.provenance["command"] == "test"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("layer_ms"), "missing key 'layer_ms'"),
        (lambda d: d.update(format="nope"), "format: expected"),
        (lambda d: d.update(format_version=9), "format_version"),
        (lambda d: d["layer_ms"].pop("gdn"), "layer_ms: missing mixer 'gdn'"),
        (lambda d: d["layer_ms"]["kda"].pop("4096"), "layer_ms.kda: missing context 4096"),
        (lambda d: d["layer_ms"]["kda"]["4096"].update(batches=[1, 8, 8, 1024]), "layer_ms.kda.4096.batches\\[2\\]"),
        (lambda d: d["layer_ms"]["kda"]["4096"].update(ms=[1.0, -2.0, 3.0, 4.0]), "layer_ms.kda.4096.ms\\[1\\]"),
        (lambda d: d["layer_ms"]["kda"]["4096"].update(ms=[1.0, 2.0]), "layer_ms.kda.4096.ms: expected a list of 4"),
        (lambda d: d["head_ms"].update(batches=[]), "head_ms.batches"),
        (lambda d: d.update(contexts=[32768, 4096]), "contexts: must increase"),
        (lambda d: d["memory"].update(bogus=1), "memory: unknown key 'bogus'"),
        (lambda d: d.update(device_memory_gib=-1), "device_memory_gib"),
        (lambda d: d["regression"][0].update(batch_policy="sometimes"), "regression\\[0\\].batch_policy"),
        (lambda d: d["idealized"]["layer_ms"].pop("kda"), "idealized.layer_ms.kda"),
    ],
)
def test_rejects_malformed_tables(spec, tmp_path, mutate, message):
    data = copy.deepcopy(table_dict(spec))
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostModelError, match=message) as e:
        CostTable.load(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path))


def test_rejects_non_json_and_missing(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(CostModelError, match="invalid JSON"):
        CostTable.load(bad)
    with pytest.raises(CostModelError, match="no such file"):
        CostTable.load(tmp_path / "missing.json")
    bad.write_text("[1, 2]")
    with pytest.raises(CostModelError, match="expected a JSON object"):
        CostTable.load(bad)


def test_config_hash_mismatch(spec):
    data = table_dict(spec)
    data["model"]["config_hash"] = "0" * 16
    t = CostTable.from_dict(data, source="other.json")
    with pytest.raises(CostModelError, match="measured for config 0000000000000000"):
        t.predict("A" * 48, 4096, "fixed:1")


def test_build_table_from_raw(spec):
    pieces = []
    for b in BATCHES:
        pieces.append({"kind": "head", "batch": b, "ms": head_cost(b)})
        pieces.append({"kind": "shared", "batch": b, "ms": 0.3})
        for m in MIXERS:
            for c in CONTEXTS if m == "attention" else (32768,):
                pieces.append({"kind": "layer", "mixer": m, "context": c, "batch": b, "ms": layer_cost(m, c, b)})
    pieces.append({"kind": "layer", "mixer": "gdn", "context": 32768, "batch": 8, "ms": layer_cost("gdn", 32768, 8) + 0.2})
    whole = []
    for i, counts in enumerate(([48, 0, 0, 0], [0, 48, 0, 0], [0, 0, 48, 0], [0, 0, 0, 48], [12, 12, 12, 12])):
        mixers = [m for m, n in zip(MIXERS, counts, strict=True) for _ in range(n)]
        whole.append({"tag": "validation", "placement": ",".join(mixers), "context": 32768, "batch": 8,
                      "policy": "fixed:8", "memory_budget_gib": 115.0, "step_ms": 10.0 + i})
    raw = {"meta": {"gpu": "Test GPU", "device_memory_gib": 139.8, "command": "x"}, "pieces": pieces, "whole": whole}
    t = build_table(raw, spec, contexts=CONTEXTS)
    assert context_independent(spec, "gdn", CONTEXTS) and not context_independent(spec, "attention", CONTEXTS)
    assert context_independent(spec, "sliding_window", CONTEXTS)
    assert t.layers["gdn"][4096] == t.layers["gdn"][32768]
    assert t.extra["measured_at_context"]["gdn"]["4096"] == 32768
    # duplicated points are reduced by the median (of 2: their mean)
    assert t.layer_ms("gdn", 32768, 8) == pytest.approx(layer_cost("gdn", 32768, 8) + 0.1)
    assert t.idealized is not None and set(t.idealized["layer_ms"]) == set(MIXERS)
    assert len(t.regression) == 1 and t.regression[0].n == 5
    assert t.provenance["command"] == "x"
    CostTable.from_dict(t.to_dict())  # what it writes, it reads
    del raw["pieces"][-2]  # drop one attention point: still fine
    assert t.extra["context_checks"] == {}  # nothing measured at a second context
    # check points of an independent mixer at another context (a few batches, 20% off) stay checks: the dense curve
    # serves every context, and their deviations are reported
    checks = [{"kind": "layer", "mixer": "gdn", "context": 4096, "batch": b, "ms": layer_cost("gdn", 32768, b) * 1.2}
              for b in (1, 64)]  # fmt: skip
    t2 = build_table({**raw, "pieces": raw["pieces"] + checks}, spec, contexts=CONTEXTS)
    assert t2.layers["gdn"][4096] == t2.layers["gdn"][32768] == t.layers["gdn"][32768]
    assert t2.extra["measured_at_context"]["gdn"] == {str(c): 32768 for c in CONTEXTS}
    assert t2.extra["context_checks"]["gdn"]["4096"] == {"reference_context": 32768, "batches": [1, 64],
                                                        "deviation": [0.2, 0.2]}  # fmt: skip
    broken = {**raw, "pieces": [r for r in pieces if not (r.get("mixer") == "attention" and r.get("context") == 4096)]}
    with pytest.raises(CostModelError, match="'attention' depends on the context and was not measured at 4096"):
        build_table(broken, spec, contexts=CONTEXTS)


def ctx_cost(mixer: str, context: int, batch: int) -> float:
    """A synthetic step-wide cost (RoPE tables, slots, validity mask): attention's grows with the context."""
    return 0.03 + 1e-5 * batch + (1e-7 * context if mixer == "attention" else 0.0)


def test_step_context_built_once_per_step(spec):
    """Layer pieces of k blocks hold 1/k of the step context; the table takes it out of the layer curve and adds it
    once per step for each attention mixer the placement has, at the step's context and batch."""
    k = 4
    pieces, step_context = [], []
    for b in BATCHES:
        pieces.append({"kind": "head", "batch": b, "ms": head_cost(b)})
        pieces.append({"kind": "shared", "batch": b, "ms": 0.3})
        for m in MIXERS:
            for c in CONTEXTS if m == "attention" else (32768,):
                ctx = ctx_cost(m, c, b) / k if m in ("attention", "sliding_window") else 0.0
                pieces.append({"kind": "layer", "mixer": m, "context": c, "batch": b, "k": k,
                               "ms": layer_cost(m, c, b) + ctx})  # fmt: skip
    for m, ctxs in (("attention", CONTEXTS), ("sliding_window", (32768,))):
        for c in ctxs:
            step_context += [{"mixer": m, "context": c, "batch": b, "ms": ctx_cost(m, c, b)} for b in (1, 1024)]
    raw = {"meta": {"gpu": "Test GPU", "device_memory_gib": 139.8}, "pieces": pieces, "step_context": step_context}
    t = build_table(raw, spec, contexts=CONTEXTS)
    assert set(t.step_context) == {"attention", "sliding_window"}
    assert t.step_context["sliding_window"][4096] == t.step_context["sliding_window"][32768]  # context-independent
    for c in CONTEXTS:
        for b in BATCHES:  # the layer curves are the blocks' own cost
            for m in MIXERS:
                assert t.layer_ms(m, c, b) == pytest.approx(layer_cost(m, c, b), rel=1e-9)
    p = ["attention"] * 3 + ["sliding_window"] * 20 + ["gdn"] * 25
    for c, b in ((4096, 1), (32768, 8), (32768, 1024)):
        want = head_cost(b) + sum(layer_cost(m, c, b) for m in p) + ctx_cost("attention", c, b) + ctx_cost(
            "sliding_window", c, b)
        assert t.step_ms(p, c, b) == pytest.approx(want, rel=1e-9)
    # a placement without attention layers pays none; an all-attention step pays once, not 48 / k times
    assert t.step_ms(["gdn"] * 48, 32768, 8) == pytest.approx(head_cost(8) + 48 * layer_cost("gdn", 32768, 8))
    assert t.step_ms(["attention"] * 48, 32768, 8) == pytest.approx(
        head_cost(8) + 48 * layer_cost("attention", 32768, 8) + ctx_cost("attention", 32768, 8))
    # between grid contexts the step context is interpolated like the layers
    assert t.step_context_ms(["attention"], 18432, 8) == pytest.approx(ctx_cost("attention", 18432, 8))
    # written and read back unchanged; the idealized constants include the all-X step's context once
    t2 = CostTable.from_dict(t.to_dict())
    assert t2.to_dict()["step_context_ms"] == t.to_dict()["step_context_ms"]  # (times rounded to 1 ns on write)
    assert t2.step_ms(p, 32768, 8) == pytest.approx(t.step_ms(p, 32768, 8), abs=1e-5)
    ideal = t.idealized["layer_ms"]["attention"]
    per_step = head_cost(16) + ctx_cost("attention", 32768, 16)
    assert ideal == pytest.approx(layer_cost("attention", 32768, 16) + per_step / 48, abs=1e-6)
    # attention's context is needed at every context its layers were measured at
    kept = [r for r in step_context if not (r["mixer"] == "attention" and r["context"] == 4096)]
    broken = {**raw, "step_context": kept}
    with pytest.raises(CostModelError, match="step context of 'attention' was not measured at context 4096"):
        build_table(broken, spec, contexts=CONTEXTS)


def test_step_context_malformed(spec):
    data = table_dict(spec)
    data["step_context_ms"] = {"mamba": {}}
    with pytest.raises(CostModelError, match=r"^bad\.json: step_context_ms: mixer 'mamba' is not in model\.mixers"):
        CostTable.from_dict(data, source="bad.json")
    data["step_context_ms"] = {"attention": {"4096": {"batches": [1], "ms": [0.03]}}}
    with pytest.raises(CostModelError, match=r"step_context_ms\.attention: missing context 32768"):
        CostTable.from_dict(data, source="bad.json")
    data["step_context_ms"] = {"attention": {str(c): {"batches": [1], "ms": [-1.0]} for c in CONTEXTS}}
    with pytest.raises(CostModelError, match=r"step_context_ms\.attention\.4096\.ms\[0\]: expected a positive time"):
        CostTable.from_dict(data, source="bad.json")
