"""The Pareto-exploration notebook runs top to bottom (small search budget) and writes its presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from placement_search.presets import read_presets

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "pareto_exploration.ipynb"


def test_pareto_notebook_executes(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    overrides = f'TRIALS = 200\nCONTEXTS = (4096, 32768)\nOUT = "{tmp_path / "nb"}"\n'
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(overrides))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # front vs evaluated, composition + layer map, contexts
    presets = read_presets(tmp_path / "nb" / "context-32768" / "presets.json")
    assert presets.presets and all(p.placement.space.num_layers == 48 for p in presets.presets)
