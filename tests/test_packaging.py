"""Packaging: every package folder is installed, and the core install does not need torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in cfg["package-dir"].items():
        base = ROOT / folder
        for sub in [base, *base.rglob("*")]:
            if sub.is_dir() and "__pycache__" not in sub.parts and (any(sub.glob("*.py")) or any(sub.glob("*.json"))):
                found.add(".".join([name, *sub.relative_to(base).parts]))
    missing = found - set(cfg["packages"])
    assert not missing, f"package folders not in pyproject packages: {sorted(missing)}"


def test_core_import_does_not_load_torch() -> None:
    code = (
        "import sys, placement_search, placement_search.cli, placement_search.presets, placement_search.formats;"
        "import placement_search.evaluators, placement_search.exact_front, placement_search.sampling;"
        "from placement_search.cli import build_parser; build_parser();"
        "assert 'torch' not in sys.modules, 'torch imported by the core'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_throughput_prediction_needs_no_torch() -> None:
    code = (
        "import sys; from placement_search.cli import main;"
        "assert main(['throughput', 'A' * 48, '--context', '32768']) == 0;"
        "assert 'torch' not in sys.modules, 'torch imported by a table prediction'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
