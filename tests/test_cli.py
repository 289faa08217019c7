"""The command line: verbs that work, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from placement_search.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hand-picked-15b.presets.json"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "placement_search", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_version_and_help() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("placement-search ")
    r = cli("--help")
    assert r.returncode == 0 and "validate" in r.stdout and "export" in r.stdout


def test_validate_all_attention_15b() -> None:
    r = cli("validate", "A" * 48)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok: placement {'A' * 48} (attention=48) fits super-apriel-15b"
    r = cli("validate", ",".join(["attention"] * 48), "--model", "super-apriel-15b")
    assert r.returncode == 0


def test_validate_rejects_bogus_at_layer_47() -> None:
    r = cli("validate", ",".join(["attention"] * 47 + ["bogus"]))
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "layer 47" in lines[0] and "'bogus'" in lines[0]
    assert "attention, sliding_window, gdn, kda" in lines[0]


def test_validate_files(tmp_path, capsys) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "3 presets" in capsys.readouterr().out
    assert main(["validate", str(ROOT / "placement_search" / "specs" / "super_apriel_15b.json")]) == 0
    assert "supernet config: 48 layers" in capsys.readouterr().out
    y = tmp_path / "p.yaml"
    y.write_text("layers: [" + ", ".join(["gdn"] * 48) + "]\n")
    assert main(["validate", str(y)]) == 0
    assert "gdn=48" in capsys.readouterr().out


def test_export_then_validate_each_format(tmp_path, capsys) -> None:
    for fmt in ("fast-llm-yaml", "vllm", "deployment-config", "json"):
        out = tmp_path / fmt
        assert main(["export", str(EXAMPLE), "-f", fmt, "-o", str(out)]) == 0
        written = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]
        assert written
        for path in written:
            assert main(["validate", path]) == 0, path
            assert capsys.readouterr().out.startswith("ok: ")
    (p,) = [tmp_path / "vllm" / "attention-every-4th.json"]
    assert json.loads(p.read_text()) == ["attention" if i % 4 == 0 else "gdn" for i in range(48)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["validate", "missing.json"], "missing.json: no such file"),
        (["validate", "AAAA"], "has 4 layers, expected 48"),
        (["export", str(EXAMPLE), "-f", "vllm", "-o", "x", "-p", "nope"], "no preset named 'nope'"),
        (["export", str(EXAMPLE), "-f", "pdf", "-o", "x"], "invalid choice: 'pdf'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["validate", "A" * 48, "--model", "nope"], "unknown model 'nope'"),
    ],
)
def test_user_errors_are_one_line(args, needle, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        code = main(args)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_export_to_unwritable_place(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["export", str(EXAMPLE), "-f", "vllm", "-o", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
