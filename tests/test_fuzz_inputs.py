"""Fuzzing the user-facing inputs: >= 1000 malformed placements, configs and preset files.

Every input must end in either ``ok`` (exit 0) or the one-line error path (exit 2): never a
traceback, never another exit code.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement_search.cli import main
from placement_search.spec import get_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = json.loads((ROOT / "examples" / "hand-picked-15b.presets.json").read_text())
CONFIG = dict(get_spec("super-apriel-15b").config)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TMP = Path(tempfile.mkdtemp(prefix="ps-fuzz-"))


def run_cli(args: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse errors
            code = int(e.code or 0)
    return code, err.getvalue()


def check(args: list[str]) -> None:
    code, err = run_cli(args)
    assert code in (0, 2), (args, code, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert all(line.startswith("placement-search") for line in lines), err
    errors = [line for line in lines if ": error: " in line]
    # warnings (one line each) may precede the error; the error itself is exactly one line
    assert len(errors) == (1 if code == 2 else 0), err
    assert all(": warning: " in line for line in lines if line not in errors), err


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=8)
tokens = st.sampled_from(["attention", "sliding_window", "gdn", "kda", "fa", "swa", "A", "S", "G", "K", "bogus",
                          "*", "*48", "*47", ",", " ", "attention*24", "gdn*", "[", "]", "{", "\"", "x", "0", "-1",
                          ".json", ".yaml", "/", "\x00", "é"])


@FUZZ
@given(st.lists(tokens, max_size=60).map("".join) | st.text(max_size=80))
def test_fuzz_placement_strings(text: str) -> None:
    if not text.strip() or "\x00" in text:
        text = text.replace("\x00", "") or "?"
    check(["validate", text])


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(base, data):
    doc = copy.deepcopy(base)
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            action = data.draw(st.sampled_from(["delete", "replace"]))
            if action == "delete" and isinstance(node, dict):
                del node[path[-1]]
            else:
                node[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    return doc


def _write(name: str, doc) -> str:
    path = TMP / name
    path.write_text(json.dumps(doc))
    return str(path)


@FUZZ
@given(st.data())
def test_fuzz_configs(data) -> None:
    check(["validate", _write("config.json", _mutate(CONFIG, data))])


@FUZZ
@given(st.data())
def test_fuzz_preset_files(data) -> None:
    path = _write("presets.json", _mutate(EXAMPLE, data))
    check(["validate", path])
    check(["export", path, "-f", data.draw(st.sampled_from(["vllm", "fast-llm-yaml", "deployment-config"])),
           "-o", str(TMP / "out")])


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["p.json", "p.yaml", "p.yml"]))
def test_fuzz_garbage_files(blob: bytes, name: str) -> None:
    text = json.dumps(EXAMPLE).encode()
    path = TMP / name
    path.write_bytes(text[: len(blob) * 7 % len(text)] + blob)  # truncated file plus garbage
    check(["validate", str(path)])
