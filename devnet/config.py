"""Sizes and settings of the dev supernet and of the pipeline that trains it.

:class:`ModelSize` describes a small supernet that mirrors Super Apriel's structure: ``num_layers`` decoder
blocks, each holding the four released mixers (``attention``, ``sliding_window``, ``gdn``, ``kda``) over a
shared gated-SiLU MLP and two RMSNorms, untied embeddings and LM head. :func:`apriel2_config` writes its
Apriel2 ``config.json`` (a ``fixed`` decoder of ``stochastic`` mixers, the release's format), which
:class:`placement_search.spec.ModelSpec` and :mod:`placement_search.evaluators` read.

:class:`Settings` gathers everything the pipeline needs (corpus, tokenizer, model, teacher and distillation
schedules, evidence); two presets exist: :func:`full_settings` (one H200, <= 15 minutes) and
:func:`tiny_settings` (a CPU smoke test in well under a minute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from placement_search.spec import ModelSpec, register_spec

#: The released mixer names, in the supernet's config order (the first is the main mixer).
MIXER_NAMES: tuple[str, ...] = ("attention", "sliding_window", "gdn", "kda")

#: End-of-text token: separates documents in the token stream and starts every synthetic block.
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of the dev supernet (every mixer of every layer)."""

    num_layers: int = 48
    hidden_size: int = 128
    vocab_size: int = 4096
    intermediate_size: int = 320
    attention_heads: int = 4
    attention_head_groups: int = 2
    attention_head_size: int = 32
    window_size: int = 64
    gdn_value_heads: int = 4
    gdn_key_heads: int = 2
    gdn_key_head_dim: int = 32
    gdn_value_head_dim: int = 32
    kda_heads: int = 4
    kda_head_dim: int = 32
    conv_kernel_size: int = 4
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-5


def apriel2_config(size: ModelSize, name: str = "placement-search-devnet") -> dict[str, Any]:
    """The supernet's Apriel2 ``config.json`` (HF format, ``model_type`` ``apriel2_text``).

    Every layer holds the same stochastic block: the four mixers keyed by :data:`MIXER_NAMES`, ``attention``
    as the main mixer; ``sliding_window`` is an attention mixer with ``window_size``.
    """
    attention = {
        "type": "attention",
        "heads": size.attention_heads,
        "head_groups": size.attention_head_groups,
        "head_size": size.attention_head_size,
        "rotary": {"type": "mistral_1d", "theta": size.rope_theta},
        "add_linear_biases": False,
    }
    conv = {"kernel_size": size.conv_kernel_size}
    mixers = {
        "attention": attention,
        "sliding_window": {**attention, "window_size": size.window_size},
        "gdn": {
            "type": "gdn",
            "value_heads": size.gdn_value_heads,
            "key_heads": size.gdn_key_heads,
            "key_head_dim": size.gdn_key_head_dim,
            "value_head_dim": size.gdn_value_head_dim,
            "convolution_layer": conv,
        },
        "kda": {
            "type": "kda",
            "heads": size.kda_heads,
            "head_dim": size.kda_head_dim,
            "convolution_layer": conv,
            "normalization": {"epsilon": size.norm_eps},
        },
    }
    norm = {"type": "rms_norm", "epsilon": size.norm_eps}
    return {
        "_name_or_path": name,
        "architectures": ["Apriel2ForCausalLM"],
        "model_type": "apriel2_text",
        "hidden_size": size.hidden_size,
        "vocab_size": size.vocab_size,
        "tie_word_embeddings": False,
        "embeddings": {"max_position_embeddings": size.max_position_embeddings},
        "head": {"normalization": norm},
        "decoder": {
            "type": "fixed",
            "num_blocks": size.num_layers,
            "block": {
                "mixer": {"type": "stochastic", "main_mixer_name": "attention", "mixers": mixers},
                "mlp": {
                    "intermediate_size": size.intermediate_size,
                    "activation": "silu",
                    "gated": True,
                    "add_linear_biases": False,
                },
                "normalization": norm,
            },
        },
    }


def model_spec(size: ModelSize, name: str = "placement-search-devnet") -> ModelSpec:
    """:class:`ModelSpec` of the supernet of ``size``."""
    return ModelSpec.from_config(apriel2_config(size, name), name=name, source=f"devnet config {name}")


def supernet_bytes(size: ModelSize, bytes_per_param: int = 2) -> int:
    """Size of the whole supernet checkpoint's tensors (bf16 by default)."""
    return model_spec(size).supernet_params() * bytes_per_param


# --------------------------------------------------------------------------------------------
# Pipeline settings


@dataclass(frozen=True)
class CorpusSettings:
    """How the offline corpus is chosen, split, tokenized and mixed (see :mod:`.corpus`)."""

    heldout_permille: int = 50  # files whose path hash mod 1000 is below this are held out (5 %)
    max_file_bytes: int = 200_000  # skip larger files (generated tables such as pydoc_data/topics.py)
    min_file_bytes: int = 256
    max_files: int | None = None  # first files in sorted order only (tiny runs)
    max_train_tokens: int = 6_000_000  # cap on the stdlib train stream (keeps the shipped npz small)
    seq_len: int = 512  # training block length (tokens)
    synthetic_train_blocks: int = 3000  # key-value retrieval blocks of seq_len tokens
    synthetic_heldout_blocks: int = 256
    synthetic_fraction: float = 0.25  # share of training rows drawn from the synthetic blocks
    seed: int = 1234


@dataclass(frozen=True)
class TrainSettings:
    """One training stage (teacher or distillation): optimiser, schedule, batches, checkpoints."""

    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (not on norms, decays, biases)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    batch_size: int = 32  # rows of seq_len tokens per optimiser step
    micro_batches: int = 1  # the batch is split into this many micro-batches (distillation: one placement each)
    steps: int | None = None  # fixed step count; None: calibrated from `minutes`
    minutes: float = 5.0  # wall-clock budget used to calibrate `steps` on the first steps
    max_steps: int = 20_000
    save_every: int = 250  # resumable train state
    eval_every: int = 250
    eval_blocks: int = 16
    log_every: int = 10
    kept_checkpoints: int = 4  # intermediate exported checkpoints kept along training (distillation)
    hidden_mse_weight: float = 0.0  # distillation: + weight * normalised hidden-state MSE
    copied_lr_scale: float = 1.0  # distillation: learning-rate factor of the mixers copied from the teacher
    seed: int = 0


@dataclass(frozen=True)
class EvidenceSettings:
    """Placements and samples of the evidence study (see :mod:`.evidence`)."""

    random_placements: int = 12
    arrangements: int = 3  # random arrangements per fixed-count group (besides the structured ones)
    eval_blocks: int = 64  # held-out stdlib blocks per sample set (two disjoint sets: A and B)
    kv_blocks: int = 128  # held-out synthetic retrieval blocks per sample set
    batch_size: int = 16
    seed: int = 7
    groups: tuple[str, ...] | None = None  # placement groups to evaluate (None: all; see evidence.py)


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline needs; written to ``settings.json`` and checked on resume."""

    preset: str = "full"
    size: ModelSize = field(default_factory=ModelSize)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    tokenizer_min_frequency: int = 2
    teacher: TrainSettings = field(default_factory=TrainSettings)
    distill: TrainSettings = field(
        default_factory=lambda: TrainSettings(lr=1e-3, warmup_steps=50, micro_batches=2, minutes=6.5,
                                              hidden_mse_weight=0.1, seed=1)
    )  # fmt: skip
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)
    save_dtype: str = "bfloat16"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        def train(d: dict[str, Any]) -> TrainSettings:
            return TrainSettings(**{**d, "betas": tuple(d["betas"])})

        return cls(
            preset=data["preset"],
            size=ModelSize(**data["size"]),
            corpus=CorpusSettings(**data["corpus"]),
            tokenizer_min_frequency=data["tokenizer_min_frequency"],
            teacher=train(data["teacher"]),
            distill=train(data["distill"]),
            evidence=EvidenceSettings(**{**data["evidence"], "groups": _tuple(data["evidence"].get("groups"))}),
            save_dtype=data["save_dtype"],
        )


def _tuple(value: list[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def full_settings() -> Settings:
    """The H200 preset: 48 x 4 supernet, hidden 128, vocab 4096, 512-token context, window 64.

    Budgets: teacher 4 minutes (GPU call 1, with the preflight), distillation 5 minutes (call 2, with the
    evidence and the stability study); see :func:`.dryrun.gpu_plan` and ``devnet/README.md``.
    """
    return Settings(
        preset="full",
        teacher=TrainSettings(lr=2e-3, warmup_steps=100, batch_size=64, minutes=4.0, seed=0),
        distill=TrainSettings(
            lr=1e-3, warmup_steps=50, batch_size=64, micro_batches=2, minutes=5.0, hidden_mse_weight=0.1,
            kept_checkpoints=4, seed=1, copied_lr_scale=0.1,
        ),
    )  # fmt: skip


def tiny_settings() -> Settings:
    """A CPU smoke test: 4 layers of hidden 32 over a few stdlib files, a handful of steps per stage."""
    size = ModelSize(
        num_layers=4, hidden_size=32, vocab_size=320, intermediate_size=64, attention_heads=2,
        attention_head_groups=1, attention_head_size=16, window_size=8, gdn_value_heads=2, gdn_key_heads=1,
        gdn_key_head_dim=16, gdn_value_head_dim=16, kda_heads=2, kda_head_dim=16, max_position_embeddings=256,
    )  # fmt: skip
    corpus = CorpusSettings(
        heldout_permille=250, max_files=40, max_file_bytes=40_000, max_train_tokens=60_000, seq_len=64,
        synthetic_train_blocks=32, synthetic_heldout_blocks=16,
    )  # fmt: skip
    stage = {"batch_size": 4, "warmup_steps": 2, "save_every": 3, "eval_every": 6, "eval_blocks": 2,
             "log_every": 1, "minutes": 0.1}  # fmt: skip
    return Settings(
        preset="tiny",
        size=size,
        corpus=corpus,
        teacher=TrainSettings(lr=3e-3, steps=6, seed=0, **stage),
        distill=TrainSettings(lr=2e-3, steps=6, micro_batches=2, hidden_mse_weight=0.1, kept_checkpoints=4,
                              seed=1, **stage),
        evidence=EvidenceSettings(random_placements=2, arrangements=1, eval_blocks=2, kv_blocks=8, batch_size=4),
    )


PRESETS = {"full": full_settings, "tiny": tiny_settings}


#: Where the pipeline ships the final dev supernet in a source checkout (``results/devnet/supernet``).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "results" / "devnet" / "supernet"


def register_devnet_spec(checkpoint: str | Path | None = None, name: str = "devnet") -> bool:
    """Register the trained dev supernet's spec under ``name`` when ``checkpoint/config.json`` exists.

    ``checkpoint``: default :data:`DEFAULT_CHECKPOINT`. Torch-free (this module imports no torch), so the
    registry can call it at import time; ``import placement_search.devnet`` does.
    """
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if not (path / "config.json").is_file():
        return False
    register_spec(name, lambda: ModelSpec.from_file(path, name=name))
    return True
