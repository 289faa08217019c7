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
