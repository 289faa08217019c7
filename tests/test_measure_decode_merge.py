"""``benchmarks/measure_decode.py --build-from`` over several runs: which rows of which run make the shipped table.

The shipped 15B table merges several H200 runs (README "Decode speed on the H200"): the pieces must come from one run
only (a table never mixes runs), and a ``RUN:KEY+KEY`` suffix must keep exactly the rows it names (sections,
``whole@TAG``, ``/LABEL`` and ``/LABEL=BATCH`` filters), so that rows measured on an older decode path cannot leak into the new table's
validation or engine rows.
"""

from __future__ import annotations


def _raw(run: str, labels: tuple[str, ...], pieces: bool) -> dict:
    return {
        "meta": {"date": run, "command": f"run {run}", "gpu": "H200"},
        "ceilings": {"copy_gbps": 4000.0 + len(run)},
        "pieces": [{"kind": "shared", "batch": 1, "ms": 1.0, "run": run}] if pieces else [],
        "whole": [{"tag": "engine", "label": lab, "batch": 1, "step_ms": 1.0, "run_id": run} for lab in labels]
        + [{"tag": "validation", "label": None, "batch": 16, "step_ms": 2.0, "run_id": run}],
        "memory_check": [{"label": lab, "actual": 10, "run_id": run} for lab in labels],
        "prefill": [{"label": "all-attention", "s": 1.0, "run_id": run}],
        "kernels": [],
        "skipped": [],
        "errors": [],
    }


def test_select_sections_keeps_only_named_rows(benchmark_module) -> None:
    md = benchmark_module("measure_decode")
    raw = _raw("a", ("all-gdn", "mixed"), pieces=True)
    assert md.select_sections(raw, None) is raw
    only = md.select_sections(raw, "prefill+whole@engine/all-gdn")
    assert only["pieces"] == [] and only["memory_check"] == [] and only["meta"] == raw["meta"]
    assert [r["label"] for r in only["whole"]] == ["all-gdn"] and len(only["prefill"]) == 1
    val = md.select_sections(raw, "whole@validation+memory_check/mixed")
    assert [r["tag"] for r in val["whole"]] == ["validation"]
    assert [r["label"] for r in val["memory_check"]] == ["mixed"]
    raw["whole"].append({"tag": "engine", "label": "all-gdn", "batch": 1115, "step_ms": 9.0})
    largest = md.select_sections(raw, "whole@engine/all-gdn=1115")  # one batch's row of one placement
    assert [(r["label"], r["batch"]) for r in largest["whole"]] == [("all-gdn", 1115)]


def test_merge_takes_pieces_from_one_run_and_filtered_rows_from_others(benchmark_module) -> None:
    md = benchmark_module("measure_decode")
    new = md.select_sections(_raw("new", ("all-attention", "all-gdn"), pieces=True), "pieces+whole@engine/all-attention+whole@validation")
    redo = md.select_sections(_raw("redo", ("all-gdn",), pieces=True), "whole@engine")
    old = md.select_sections(_raw("old", ("all-attention", "all-gdn"), pieces=True), "prefill")
    merged = md.merge_raw([new, redo, old], ["new", "redo:whole@engine", "old:prefill"])
    assert [p["run"] for p in merged["pieces"]] == ["new"] and merged["meta"]["pieces_from"] == "new"
    engine = sorted((r["label"], r["run_id"]) for r in merged["whole"] if r["tag"] == "engine")
    assert engine == [("all-attention", "new"), ("all-gdn", "redo")]
    assert [r["run_id"] for r in merged["whole"] if r["tag"] == "validation"] == ["new"]
    assert [r["run_id"] for r in merged["prefill"]] == ["old"] and merged["memory_check"] == []
    assert [r["source"] for r in merged["meta"]["runs"]] == ["new", "redo:whole@engine", "old:prefill"]


def test_merge_takes_step_context_rows_from_the_run_that_names_them(benchmark_module) -> None:
    """The step-context rows (the attention mixers' step-wide work) of a later short run join an earlier run's
    pieces; the earlier run's own (none, or older ones left out by its suffix) do not."""
    md = benchmark_module("measure_decode")
    main = {**_raw("main", ("all-gdn",), pieces=True), "step_context": [{"mixer": "attention", "ms": 9.0}]}
    ctx = {**_raw("ctx", (), pieces=False), "step_context": [{"mixer": "attention", "context": 4096, "batch": 1,
                                                              "ms": 0.03}]}  # fmt: skip
    merged = md.merge_raw([md.select_sections(main, "pieces+whole@engine"), md.select_sections(ctx, "step_context")],
                          ["main:pieces+whole@engine", "ctx:step_context"])  # fmt: skip
    assert [(r["ms"], r["run"]) for r in merged["step_context"]] == [(0.03, "ctx:step_context")]
    assert merged["meta"]["pieces_from"] == "main:pieces+whole@engine" and merged["prefill"] == []
