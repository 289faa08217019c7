"""placement_search.evaluators: the supernet runtime, throughput measurement and the cost model.

- :class:`Supernet` — every mixer of every layer; ``set_placement`` picks one per layer; ``forward``,
  ``prefill``/``decode_step`` with a :class:`Cache` from ``new_cache``, ``generate``.
- :func:`load_supernet` / :func:`save_checkpoint` — Apriel2 HF checkpoints (supernet, thin, fixed/pattern export).
- :func:`random_supernet` — random weights at any size, materialised directly on the target device.
- :func:`load_tokenizer` — the checkpoint's tokenizer, offline.

The runtime needs the ``runtime`` extra (torch, safetensors). Names are imported lazily, so modules
that need no torch (the memory and cost models) load on the core install:
``import placement_search.evaluators.cost_model`` never imports torch.
"""

from __future__ import annotations

from placement_search._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "AttentionCache": "cache",
    "Cache": "cache",
    "CacheError": "cache",
    "GDNCache": "cache",
    "KDACache": "cache",
    "CheckpointError": "checkpoint",
    "checkpoint_name": "checkpoint",
    "export_config": "checkpoint",
    "load_supernet": "checkpoint",
    "random_supernet": "checkpoint",
    "save_checkpoint": "checkpoint",
    "GDN": "mixers",
    "KDA": "mixers",
    "Attention": "mixers",
    "RMSNorm": "mixers",
    "build_mixer": "mixers",
    "Supernet": "supernet",
    "mixers_for": "supernet",
    "sample": "supernet",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
