"""placement_search.devnet: a small 48 x 4 dev supernet trained here by stochastic distillation.

Super Apriel's structure (48 layers, each offering ``attention``, ``sliding_window``, ``gdn`` and ``kda`` over a
shared MLP and norms) at small width, trained the way the release describes: an all-attention teacher from
scratch, then a supernet whose mixers are initialised from it and trained by distillation with one uniformly
drawn placement per micro-batch. Modules:

- :mod:`.config` — model sizes, the Apriel2 config, pipeline settings and presets (``full``, ``tiny``);
- :mod:`.corpus` — the stdlib corpus, its file split, synthetic key-value retrieval blocks, ``corpus.npz``;
- :mod:`.tokenizer` — byte-level BPE trained on the train split, loadable by ``AutoTokenizer`` offline;
- :mod:`.data` — deterministic training batches; :mod:`.state` — resumable state and JSONL logs;
- :mod:`.loop` — the shared training loop; :mod:`.teacher`; :mod:`.transfer` — teacher -> supernet init;
- :mod:`.distill` — stochastic distillation; :mod:`.evaluate` — per-placement quality;
- :mod:`.evidence` — the evidence that placements differ; :mod:`.budget` — GPU time estimate;
- :mod:`.snapshots` — compact intermediate checkpoints (mixer tensors overlaid on the final supernet);
- :mod:`.preflight` — GPU gradient checks of every mixer path, with fallbacks; :mod:`.dryrun` — the CPU
  dry run at full model size and the GPU plan; :mod:`.transport` — packing outputs for the device's limits;
- :mod:`.train` — the resumable pipeline; ``python -m placement_search.devnet train ...``.

Needs the ``runtime`` extra (torch, safetensors, transformers/tokenizers). Importing this package registers
the ``devnet`` spec when ``results/devnet/supernet`` exists (torch-free; see :func:`.config.register_devnet_spec`).
"""

from placement_search.devnet.config import register_devnet_spec

register_devnet_spec()
