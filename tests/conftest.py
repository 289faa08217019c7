"""Shared test settings."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI runs the property-based tests with a fixed seed so a landing never depends on luck;
# developers get fresh examples on every run.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


# --------------------------------------------------------------------------------------------
# runtime (evaluators/): a tiny Apriel2 supernet config with the four released mixers

RUNTIME_ATTENTION = {
    "type": "attention",
    "heads": 4,
    "head_groups": 2,
    "head_size": 16,
    "rotary": {"type": "mistral_1d", "theta": 10000.0},
    "add_linear_biases": False,
}


def runtime_tiny_config(num_blocks: int = 5, *, tie: bool = False, biases: bool = False, vision: bool = False) -> dict:
    """Hidden 64, vocab 97, 4 heads / 2 KV heads of 16, SWA window 5, GDN with grouped value heads, KDA."""
    attention = {**RUNTIME_ATTENTION, "add_linear_biases": biases}
    mixers = {
        "attention": attention,
        "sliding_window": {**attention, "window_size": 5},
        "gdn": {
            "type": "gdn",
            "value_heads": 4,
            "key_heads": 2,
            "key_head_dim": 16,
            "value_head_dim": 12,
            "convolution_layer": {"kernel_size": 4},
        },
        "kda": {"type": "kda", "heads": 4, "head_dim": 16, "convolution_layer": {"kernel_size": 4}},
    }
    config = {
        "architectures": ["Apriel2ForConditionalGeneration" if vision else "Apriel2ForCausalLM"],
        "model_type": "apriel2" if vision else "apriel2_text",
        "hidden_size": 64,
        "vocab_size": 97,
        "tie_word_embeddings": tie,
        "embeddings": {"max_position_embeddings": 256},
        "head": {"normalization": {"type": "rms_norm", "epsilon": 1e-5}},
        "decoder": {
            "type": "fixed",
            "num_blocks": num_blocks,
            "block": {
                "mixer": {"type": "stochastic", "main_mixer_name": "attention", "mixers": mixers},
                "mlp": {"intermediate_size": 96, "activation": "silu", "gated": True, "add_linear_biases": False},
                "normalization": {"type": "rms_norm", "epsilon": 1e-5},
            },
        },
    }
    if vision:
        config["vision_encoder"] = {"hidden_size": 8}
    return config


@pytest.fixture(scope="session")
def runtime_make_config():
    """``runtime_tiny_config`` itself (tests call it with variants: tied head, biases, vision keys)."""
    return runtime_tiny_config


@pytest.fixture(scope="session")
def triton_interpreter():
    """Run a test file's ``_run_all(seed)`` in a child process under Triton's interpreter, with a fresh seed.

    ``TRITON_INTERPRET=1`` must be set before triton is imported (``triton.jit`` reads it when a kernel is
    decorated), hence the child process: ``python TEST_FILE SEED`` must print the results as JSON on its last line.
    Returns ``{"seed": SEED, **results}``; the seed is in every failure message.
    """
    import json
    import subprocess
    import sys

    def run(test_file: str, timeout: int = 300) -> dict:
        pytest.importorskip("triton", reason="triton is in the dev extra; Triton kernels are tested in its interpreter")
        seed = int.from_bytes(os.urandom(4), "little") % 1_000_000
        proc = subprocess.run(
            [sys.executable, test_file, str(seed)],
            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-4000:]}"
        return {"seed": seed, **json.loads(proc.stdout.strip().splitlines()[-1])}

    return run


@pytest.fixture(scope="session")
def benchmark_module():
    """Import a script of ``benchmarks/`` (not a package) by module name, e.g. ``benchmark_module("measure_decode")``;
    the folder is on ``sys.path`` only for the import (the scripts import their siblings by name)."""
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")

    def load(name: str):
        sys.path.insert(0, bench)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(bench)

    return load
