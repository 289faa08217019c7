"""Model specs: what an Apriel2 ``config.json`` says about each layer.

:func:`ModelSpec.from_config` reads the HF-format Apriel2 config (``fixed`` or ``pattern`` decoder,
stochastic supernet mixers or plain ones) into per-layer mixer specs with their sizes, plus the
shared sizes (hidden, MLP, vocabulary, norms). The mixer names are whatever the config's
``mixers`` mapping holds; nothing here assumes four.

Built-in specs live in a registry (:func:`get_spec`, :func:`register_spec`): ``super-apriel-15b``
ships with the package; the dev supernet registers itself when its checkpoint is present.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from placement_search.errors import ConfigError
from placement_search.placement import SearchSpace

#: Mixer ``type`` spellings accepted in configs, mapped to the kind this package implements.
MIXER_TYPES: dict[str, str] = {
    "attention": "attention",
    "gdn": "gdn",
    "gated_delta_net": "gdn",
    "kda": "kda",
    "kimi_linear_attention": "kda",
    "kimi_delta_attention": "kda",
}


# --------------------------------------------------------------------------------------------
# Mixer specs


@dataclass(frozen=True)
class AttentionSpec:
    """Full or sliding-window attention (GQA + RoPE). ``window_size`` is ``None`` for full attention."""

    heads: int
    head_groups: int
    head_size: int
    rope_theta: float
    window_size: int | None = None
    add_linear_biases: bool = False
    kind: str = field(default="attention", init=False)

    @property
    def is_sliding(self) -> bool:
        return self.window_size is not None

    def num_params(self, hidden_size: int) -> int:
        q = self.heads * self.head_size
        kv = self.head_groups * self.head_size
        weights = hidden_size * (q + 2 * kv) + q * hidden_size
        biases = (q + 2 * kv + hidden_size) if self.add_linear_biases else 0
        return weights + biases


@dataclass(frozen=True)
class GDNSpec:
    """Gated DeltaNet: ``key_heads`` q/k heads of ``key_head_dim``, ``value_heads`` v heads of ``value_head_dim``."""

    value_heads: int
    key_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel_size: int = 4
    norm_eps: float = 1e-5
    kind: str = field(default="gdn", init=False)

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def num_params(self, hidden_size: int) -> int:
        qkvz = hidden_size * (2 * self.key_dim + 2 * self.value_dim)
        ba = hidden_size * 2 * self.value_heads
        conv = self.conv_dim * self.conv_kernel_size
        out = self.value_dim * hidden_size
        return qkvz + ba + conv + out + 2 * self.value_heads + self.value_head_dim


@dataclass(frozen=True)
class KDASpec:
    """Kimi Delta Attention: ``heads`` heads of ``head_dim`` for q, k and v."""

    heads: int
    head_dim: int
    conv_kernel_size: int = 4
    norm_eps: float = 1e-5
    kind: str = field(default="kda", init=False)

    @property
    def proj_dim(self) -> int:
        return self.heads * self.head_dim

    def num_params(self, hidden_size: int) -> int:
        d, hd, pd = hidden_size, self.head_dim, self.proj_dim
        qkv = 3 * pd * d
        conv = 3 * pd * self.conv_kernel_size
        gates = 2 * (hd * d + pd * hd)  # f_a, f_b, g_a, g_b
        beta = self.heads * d
        out = d * pd
        return qkv + conv + gates + beta + out + self.heads + pd + hd


MixerSpec = AttentionSpec | GDNSpec | KDASpec


@dataclass(frozen=True)
class MLPSpec:
    intermediate_size: int
    activation: str = "silu"
    gated: bool = True
    add_linear_biases: bool = False

    def num_params(self, hidden_size: int) -> int:
        n = (3 if self.gated else 2) * hidden_size * self.intermediate_size
        if self.add_linear_biases:
            n += (2 if self.gated else 1) * self.intermediate_size + hidden_size
        return n


@dataclass(frozen=True)
class LayerSpec:
    """One decoder block: its mixers (by name, in config order), the shared MLP and norm."""

    mixers: Mapping[str, MixerSpec]
    main_mixer: str
    stochastic: bool
    mlp: MLPSpec
    norm_eps: float


# --------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ModelSpec:
    """Per-layer mixers and shared sizes of an Apriel2 model, parsed from its ``config.json``."""

    name: str
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    head_norm_eps: float
    layers: tuple[LayerSpec, ...]
    config: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def mixer_names(self) -> tuple[str, ...]:
        """Every mixer name in the model, in first-seen order."""
        seen: dict[str, None] = {}
        for layer in self.layers:
            for name in layer.mixers:
                seen.setdefault(name, None)
        return tuple(seen)

    @cached_property
    def search_space(self) -> SearchSpace:
        """Placements of this model: layer ``i`` may use any mixer that block ``i`` holds."""
        return SearchSpace(
            self.num_layers,
            self.mixer_names,
            tuple(frozenset(layer.mixers) for layer in self.layers),
        )

    @cached_property
    def config_hash(self) -> str:
        """SHA-256 of the config's canonical JSON (sorted keys), first 16 hex digits."""
        return config_hash(self.config)

    def mixer(self, layer: int, name: str) -> MixerSpec:
        """Spec of mixer ``name`` at ``layer``."""
        try:
            return self.layers[layer].mixers[name]
        except IndexError:
            raise ConfigError(f"{self.name}: no layer {layer} (model has {self.num_layers})") from None
        except KeyError:
            raise ConfigError(
                f"{self.name}: layer {layer} has no mixer {name!r}; it has {', '.join(self.layers[layer].mixers)}"
            ) from None

    def shared_params(self) -> int:
        """Embeddings, head, final norm, and every layer's MLP and two norms."""
        d = self.hidden_size
        n = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        for layer in self.layers:
            n += layer.mlp.num_params(d) + 2 * d
        return n

    def placement_params(self, mixers: list[str] | tuple[str, ...]) -> int:
        """Parameters of a placement (shared part plus the chosen mixer of each layer)."""
        return self.shared_params() + sum(
            self.mixer(i, name).num_params(self.hidden_size) for i, name in enumerate(mixers)
        )

    def supernet_params(self) -> int:
        """Parameters of the whole supernet (every mixer of every layer)."""
        return self.shared_params() + sum(
            m.num_params(self.hidden_size) for layer in self.layers for m in layer.mixers.values()
        )

    # -- parsing --------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, name: str | None = None, source: str = "config.json") -> ModelSpec:
        """Parse an Apriel2 config dict. Errors name ``source`` and the key path."""
        return _Parser(source).model(config, name)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], name: str | None = None) -> ModelSpec:
        """Parse ``config.json`` (or a checkpoint directory holding one)."""
        from placement_search.files import load_json

        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return cls.from_config(load_json(p), name=name or p.parent.name or p.stem, source=str(p))


def config_hash(config: Mapping[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Parser:
    """Walks a config dict, naming the key path of anything malformed."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def obj(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object, got {_show(value)}")
        return value

    def get(self, obj: Mapping[str, Any], key: str, path: str, default: Any = ...) -> Any:
        if key in obj:
            return obj[key]
        if default is ...:
            raise self.fail(f"{path}.{key}" if path else key, "missing")
        return default

    def pos_int(self, obj: Mapping[str, Any], key: str, path: str, default: Any = ...) -> int:
        value = self.get(obj, key, path, default)
        where = f"{path}.{key}" if path else key
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(where, f"expected a positive integer, got {_show(value)}")
        if value > 1 << 40:
            raise self.fail(where, f"value {value} is implausibly large")
        return value

    def pos_float(self, obj: Mapping[str, Any], key: str, path: str, default: Any = ...) -> float:
        value = self.get(obj, key, path, default)
        where = f"{path}.{key}" if path else key
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise self.fail(where, f"expected a positive number, got {_show(value)}")
        return float(value)

    def boolean(self, obj: Mapping[str, Any], key: str, path: str, default: Any = ...) -> bool:
        value = self.get(obj, key, path, default)
        if not isinstance(value, bool):
            raise self.fail(f"{path}.{key}" if path else key, f"expected true or false, got {_show(value)}")
        return value

    def norm_eps(self, norm: Any, path: str, default: float) -> float:
        if norm is None:
            return default
        norm = self.obj(norm, path)
        kind = norm.get("type", "rms_norm")
        if kind != "rms_norm":
            raise self.fail(f"{path}.type", f"only rms_norm is supported, got {_show(kind)}")
        return self.pos_float(norm, "epsilon", path, default)

    # -- mixers ---------------------------------------------------------------------------------

    def mixer(self, cfg: Any, path: str, rope_default: float) -> MixerSpec:
        cfg = self.obj(cfg, path)
        raw_type = self.get(cfg, "type", path)
        kind = MIXER_TYPES.get(raw_type) if isinstance(raw_type, str) else None
        if kind is None:
            raise self.fail(
                f"{path}.type", f"unsupported mixer type {_show(raw_type)}; supported: {', '.join(sorted(MIXER_TYPES))}"
            )
        if kind == "attention":
            heads = self.pos_int(cfg, "heads", path)
            groups = self.pos_int(cfg, "head_groups", path, heads)
            if heads % groups:
                raise self.fail(f"{path}.head_groups", f"{groups} does not divide heads={heads}")
            rotary = cfg.get("rotary")
            theta = rope_default
            if rotary is not None:
                rotary = self.obj(rotary, f"{path}.rotary")
                theta = self.pos_float(rotary, "theta", f"{path}.rotary", rope_default)
            window = cfg.get("window_size")
            if window is not None:
                window = self.pos_int(cfg, "window_size", path)
            if "add_linear_biases" not in cfg:
                warnings.warn(
                    f"{self.source}: {path}.add_linear_biases missing (some exports omit it for true); "
                    "the loader trusts the tensors present",
                    stacklevel=4,
                )
            biases = cfg.get("add_linear_biases", False)
            if not isinstance(biases, bool):
                raise self.fail(f"{path}.add_linear_biases", f"expected true or false, got {_show(biases)}")
            return AttentionSpec(
                heads=heads,
                head_groups=groups,
                head_size=self.pos_int(cfg, "head_size", path),
                rope_theta=theta,
                window_size=window,
                add_linear_biases=biases,
            )
        conv = cfg.get("convolution_layer", {})
        conv = self.obj(conv, f"{path}.convolution_layer")
        kernel = self.pos_int(conv, "kernel_size", f"{path}.convolution_layer", 4)
        if kind == "gdn":
            vh = self.pos_int(cfg, "value_heads", path)
            kh = self.pos_int(cfg, "key_heads", path)
            if vh % kh:
                raise self.fail(f"{path}.key_heads", f"{kh} does not divide value_heads={vh}")
            eps = self.norm_eps(cfg.get("normalization"), f"{path}.normalization", 1e-5)
            return GDNSpec(
                value_heads=vh,
                key_heads=kh,
                key_head_dim=self.pos_int(cfg, "key_head_dim", path),
                value_head_dim=self.pos_int(cfg, "value_head_dim", path),
                conv_kernel_size=kernel,
                norm_eps=eps,
            )
        eps = self.norm_eps(cfg.get("normalization"), f"{path}.normalization", 1e-5)
        return KDASpec(
            heads=self.pos_int(cfg, "heads", path),
            head_dim=self.pos_int(cfg, "head_dim", path),
            conv_kernel_size=kernel,
            norm_eps=eps,
        )

    def block(
        self, cfg: Any, path: str, rope_default: float, eps_default: float, block_name: str | None = None
    ) -> LayerSpec:
        cfg = self.obj(cfg, path)
        mixer = self.obj(self.get(cfg, "mixer", path), f"{path}.mixer")
        mpath = f"{path}.mixer"
        if mixer.get("type") == "stochastic":
            mixers_cfg = self.obj(self.get(mixer, "mixers", mpath), f"{mpath}.mixers")
            if not mixers_cfg:
                raise self.fail(f"{mpath}.mixers", "is empty")
            mixers: dict[str, MixerSpec] = {}
            for mname, mcfg in mixers_cfg.items():
                if not isinstance(mname, str) or not mname or not mname.replace("_", "").replace("-", "").isalnum():
                    raise self.fail(f"{mpath}.mixers", f"invalid mixer name {_show(mname)}")
                mixers[mname] = self.mixer(mcfg, f"{mpath}.mixers.{mname}", rope_default)
            main = mixer.get("main_mixer_name", next(iter(mixers)))
            if not isinstance(main, str) or main not in mixers:
                raise self.fail(f"{mpath}.main_mixer_name", f"{_show(main)} is not one of {', '.join(mixers)}")
            stochastic = True
        else:
            spec = self.mixer(mixer, mpath, rope_default)
            # A plain mixer's name: an explicit "name", else the pattern block's name (deployment configs key
            # blocks by mixer name, apriel2.md §5), else the name its type implies.
            if isinstance(mixer.get("name"), str):
                main = mixer["name"]
            elif block_name is not None:
                main = block_name
            else:
                main = default_mixer_name(spec)
            mixers = {main: spec}
            stochastic = False
        mlp = self.obj(self.get(cfg, "mlp", path), f"{path}.mlp")
        act = mlp.get("activation", "silu")
        if act != "silu":
            raise self.fail(f"{path}.mlp.activation", f"only silu is supported, got {_show(act)}")
        mlp_spec = MLPSpec(
            intermediate_size=self.pos_int(mlp, "intermediate_size", f"{path}.mlp"),
            activation="silu",
            gated=self.boolean(mlp, "gated", f"{path}.mlp", True),
            add_linear_biases=self.boolean(mlp, "add_linear_biases", f"{path}.mlp", False),
        )
        eps = self.norm_eps(cfg.get("normalization"), f"{path}.normalization", eps_default)
        return LayerSpec(mixers=mixers, main_mixer=main, stochastic=stochastic, mlp=mlp_spec, norm_eps=eps)

    def model(self, config: Any, name: str | None) -> ModelSpec:
        config = self.obj(config, "(top level)")
        hidden = self.pos_int(config, "hidden_size", "")
        vocab = self.pos_int(config, "vocab_size", "")
        tie = self.boolean(config, "tie_word_embeddings", "", False)
        emb = config.get("embeddings") or {}
        emb = self.obj(emb, "embeddings")
        max_pos = (
            self.pos_int(emb, "max_position_embeddings", "embeddings")
            if "max_position_embeddings" in emb
            else self.pos_int(config, "max_position_embeddings", "", 131072)
        )
        rope_default = self.pos_float(config, "rope_theta", "", 10000.0)
        eps_default = self.pos_float(config, "rms_norm_eps", "", 1e-5)
        head = self.obj(config.get("head") or {}, "head")
        head_eps = self.norm_eps(head.get("normalization"), "head.normalization", eps_default)
        decoder = self.obj(self.get(config, "decoder", ""), "decoder")
        dtype = decoder.get("type", "fixed")
        n = self.pos_int(decoder, "num_blocks", "decoder")
        if n > 4096:
            raise self.fail("decoder.num_blocks", f"{n} layers is more than the 4096 supported")
        if dtype == "fixed":
            block = self.block(self.get(decoder, "block", "decoder"), "decoder.block", rope_default, eps_default)
            layers = (block,) * n
        elif dtype == "pattern":
            pattern = self.get(decoder, "pattern", "decoder")
            if not isinstance(pattern, list) or not pattern:
                raise self.fail("decoder.pattern", f"expected a non-empty list of block names, got {_show(pattern)}")
            blocks = self.obj(self.get(decoder, "blocks", "decoder"), "decoder.blocks")
            parsed: dict[str, LayerSpec] = {}
            for i, bname in enumerate(pattern):
                if not isinstance(bname, str) or bname not in blocks:
                    raise self.fail(f"decoder.pattern[{i}]", f"block {_show(bname)} is not in decoder.blocks")
                if bname not in parsed:
                    parsed[bname] = self.block(
                        blocks[bname], f"decoder.blocks.{bname}", rope_default, eps_default, block_name=bname
                    )
            layers = tuple(parsed[pattern[i % len(pattern)]] for i in range(n))
        else:
            raise self.fail("decoder.type", f"expected 'fixed' or 'pattern', got {_show(dtype)}")
        model_name = name or str(config.get("_name_or_path") or "apriel2")
        return ModelSpec(
            name=model_name,
            hidden_size=hidden,
            vocab_size=vocab,
            tie_word_embeddings=tie,
            max_position_embeddings=max_pos,
            head_norm_eps=head_eps,
            layers=layers,
            config=copy.deepcopy(dict(config)),
        )


def default_mixer_name(spec: MixerSpec) -> str:
    """The name a plain mixer of this kind goes by: attention, sliding_window, gdn or kda."""
    if isinstance(spec, AttentionSpec):
        return "sliding_window" if spec.is_sliding else "attention"
    return spec.kind


def _show(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Registry of built-in specs

_SPECS_DIR = Path(__file__).parent / "specs"
_REGISTRY: dict[str, Callable[[], ModelSpec]] = {}


def register_spec(name: str, factory: Callable[[], ModelSpec]) -> None:
    """Register a built-in spec under ``name`` (``factory`` is called lazily, once)."""
    _REGISTRY[name] = factory
    _cache.pop(name, None)


_cache: dict[str, ModelSpec] = {}


def spec_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """A registered spec by name, or a ``config.json`` path / checkpoint directory."""
    if name in _REGISTRY:
        if name not in _cache:
            _cache[name] = _REGISTRY[name]()
        return _cache[name]
    if os.sep in name or name.endswith(".json") or Path(name).exists():
        return ModelSpec.from_file(name)
    raise ConfigError(f"unknown model {name!r}; built-in: {', '.join(spec_names())}, or give a config.json path")


def _packaged(filename: str, name: str) -> Callable[[], ModelSpec]:
    def load() -> ModelSpec:
        return ModelSpec.from_file(_SPECS_DIR / filename, name=name)

    return load


register_spec("super-apriel-15b", _packaged("super_apriel_15b.json", "super-apriel-15b"))
DEFAULT_SPEC = "super-apriel-15b"

#: The dev supernet trained by ``python -m placement_search.devnet train`` (a source checkout's results/).
DEVNET_CHECKPOINT = Path(__file__).resolve().parent.parent / "results" / "devnet" / "supernet"
if (DEVNET_CHECKPOINT / "config.json").is_file():
    register_spec("devnet", lambda: ModelSpec.from_file(DEVNET_CHECKPOINT, name="devnet"))
