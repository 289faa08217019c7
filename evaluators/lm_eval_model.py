"""An lm-eval model (``placement-search``) that evaluates one placement of a Super Apriel supernet.

The class :class:`PlacementSearchLM` subclasses ``lm_eval.api.model.LM`` and implements ``loglikelihood``,
``loglikelihood_rolling`` and ``generate_until`` in batches on CPU or GPU. Its model arguments::

    pretrained=DIR          Apriel2 checkpoint directory (config.json + safetensors + tokenizer files)
    placement=CODE          compact code (``AAGS...``), ``attention*24+gdn*24`` (``+`` separates layers, as
                            lm-eval splits model_args at commas), or a placement file; default: the main mixers
    device=cpu|cuda[:N]     default cpu
    dtype=auto|float32|bfloat16|float16   default auto (the checkpoint's dtype on GPU, float32 on CPU)
    batch_size=N            sequences per forward (default 16)
    max_length=N            longest sequence fed (default: the config's max_position_embeddings)
    max_gen_toks=N          default generation length (default 256)
    tokenizer=DIR           tokenizer directory (default: ``pretrained``)

Scoring conventions (shared by :mod:`.campaign`, which must report the same numbers):

- Every request is scored after the tokenizer's EOS token (the dev supernet's documents start with it):
  context tokens are ``[eos] + encode(context)``; the continuation is encoded on its own
  (``encode(continuation)``), so a value is scored as the tokens the corpus generator wrote.
- ``loglikelihood_rolling`` cuts ``[eos] + encode(text)`` into lm-eval's disjoint rolling windows
  (``get_rolling_token_windows`` with context length 1) and sums the windows.
- Sequences are cut from the left to ``max_length + 1`` tokens. Requests whose input tokens are a prefix
  of another request's input tokens are read from that longer sequence's forward (the mixers are causal),
  so a key-value document with many queries costs one forward; sequences are right-padded in a batch.
  Requests sharing a context (the choices of a multiple-choice question) are scored from one pass over the
  context: it is prefilled into a decode cache whose rows are copied per choice, and each choice's tokens are
  fed as decode steps (:class:`ScoringPlan`); the values agree with full forwards to float rounding.

lm-eval 0.4.13 has no plugin entry point for models: a model is found when the module that registers it has been
imported. Importing this module registers ``placement-search``; for the command line run this module, which
imports it and hands the arguments to lm-eval's own CLI::

    python -m placement_search.evaluators.lm_eval_model run --model placement-search \\
        --model_args pretrained=DIR,placement=CODE,device=cuda,batch_size=64 \\
        --include_path TASK_DIR --tasks ps_code_bpb,ps_code_mc

(``run`` may be left out, as with ``lm_eval``). From Python: ``import placement_search.evaluators.lm_eval_model``
then ``lm_eval.simple_evaluate(model="placement-search", model_args=...)`` or pass an instance as ``model=``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models: the registry is filled lazily only when empty)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from placement_search.errors import PlacementSearchError
from placement_search.evaluators.cache import Cache
from placement_search.evaluators.checkpoint import load_supernet
from placement_search.evaluators.supernet import Supernet
from placement_search.evaluators.tokenizer import load_tokenizer
from placement_search.placement import Placement

#: One scoring unit: (context token ids, continuation token ids); the continuation is what is scored.
TokenRequest = tuple[tuple[int, ...], tuple[int, ...]]

MODEL_NAME = "placement-search"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """``auto``/``None`` -> ``None`` on GPU (the checkpoint's dtype) and float32 on CPU; else the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return None if torch.device(device).type == "cuda" else torch.float32
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise PlacementSearchError(f"dtype {name!r}: choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


def parse_placement(value: str | Placement | Sequence[str] | None, model: Supernet) -> Placement:
    """A placement from a code, ``name*k+name*k`` (``+`` or ``,`` between layers), a file, or names."""
    space = model.spec.search_space
    if value is None or value == "":
        return Placement([layer.main_mixer for layer in model.spec.layers], space)
    if isinstance(value, str) and "+" in value and not os.path.exists(value):
        value = value.replace("+", ",")
    return Placement.parse(value, space)


class Scorer:
    """Log-likelihoods of token requests under a supernet's current placement, batched, with prefix sharing."""

    def __init__(self, model: Supernet, *, batch_size: int = 16, max_length: int = 4096) -> None:
        if batch_size < 1:
            raise PlacementSearchError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise PlacementSearchError(f"max_length must be >= 2, got {max_length}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length

    def plan(self, requests: Sequence[TokenRequest]) -> ScoringPlan:
        """Group ``requests`` into the sequences to forward (once; reused for every placement)."""
        return ScoringPlan(requests, self.max_length, self.batch_size)

    @torch.no_grad()
    def score(self, requests: Sequence[TokenRequest] | ScoringPlan) -> list[tuple[float, bool]]:
        """Per request: (sum of the continuation's log-probabilities, whether every token is the argmax)."""
        plan = requests if isinstance(requests, ScoringPlan) else self.plan(requests)
        return plan.run(self.model)


def copy_cache_rows(dst: Cache, src: Cache, dst_rows: torch.Tensor, src_rows: torch.Tensor) -> None:
    """``dst``'s rows ``dst_rows`` become copies of ``src``'s rows ``src_rows`` (every layer state and ``pos``).

    Both caches must belong to the same placement and have the same ``max_len`` (so ring caches have the same
    size); only the caches' public per-row tensors are touched (the shared ``slots`` index is not per row).
    """
    if dst.placement != src.placement or dst.max_len != src.max_len:
        raise PlacementSearchError("copy_cache_rows needs caches of one placement and one max_len")
    for d, s in zip(dst.layers, src.layers, strict=True):
        for f in dataclasses.fields(d):
            a, b = getattr(d, f.name), getattr(s, f.name)
            if f.name == "slots" or not isinstance(a, torch.Tensor):
                continue
            a[dst_rows] = b[src_rows]
    dst.pos[dst_rows] = src.pos[src_rows]


def cache_row_prefix(cache: Cache, rows: int, length: int) -> Cache:
    """A cache whose tensors are views of ``cache``'s first ``rows`` rows, holding ``length`` tokens (host count).

    Decode steps on it update those rows of ``cache`` in place (the mixers' steps write into the cache tensors
    they are given), so a batch can drop finished rows without copying the states.
    """
    view = copy.copy(cache)
    view.layers = [
        dataclasses.replace(
            layer,
            **{
                f.name: getattr(layer, f.name)[:rows]
                for f in dataclasses.fields(layer)
                if f.name != "slots" and isinstance(getattr(layer, f.name), torch.Tensor)
            },
        )
        for layer in cache.layers
    ]
    view.pos = cache.pos[:rows]
    view.batch = rows
    view.length = length
    return view


@dataclass
class _Chunk:
    """Shared-context groups scored together: their contexts are prefilled (one forward per distinct length),
    the cache rows replicated once per branch, and the branches fed as decode steps in one batch (longest
    first; a row leaves the batch when its tail is done, so no padding is fed)."""

    stems: dict[int, list[tuple[int, ...]]]  # context length -> the contexts (one row each) of that length
    stem_rows: dict[int, list[int]]  # context length -> each context's index in the chunk
    branch_src: list[int]  # per branch row: its context's index in the chunk
    tails: list[tuple[int, ...]]  # per branch row, longest first: the tokens after the context
    max_len: int  # the cache length: longest context + decode steps
    segments: list[tuple[int, int, int]]  # (rows, first step, end step): the first rows still decoding
    gather: tuple[torch.Tensor, ...] = ()  # (table index, token, owner) per scored token


class ScoringPlan:
    """Requests cut to the model's length and mapped onto the fewest distinct sequences (prefix sharing), with
    sequences that share a context (multiple choice) run as one context pass plus their continuations.

    Sorting the input sequences lexicographically puts a sequence right before every longer one it is a prefix
    of, so one backward pass finds, for each input, the longest sequence that extends it (its *root*).

    Each root's *context* is its prefix up to the first predicted position (inclusive). Roots sharing a context
    form a group; a group of two or more roots whose context is at least as long as its longest tail (the tokens
    after the context) is scored from one pass over the context: the context is prefilled into a decode cache,
    the cache rows are copied once per root, and the tails are fed as batched, unpadded decode steps (logits at
    the last context position are shared by every root of the group). ``batch_size`` groups make one chunk; its
    decode batch holds one cache row per root. Every other root is forwarded whole, longest first, in
    right-padded batches of ``batch_size``.

    Decode steps and a full forward add the same terms in a different order, so the two paths agree to float
    rounding (about 1e-6 relative in float32), not bit for bit.

    ``share_contexts=False`` forwards every root whole instead: more tokens, but a few large right-padded batches
    rather than one prefill per distinct context length plus a decode step per tail token, which on a GPU (where a
    small model's step is launch-bound) is the faster plan.
    """

    def __init__(
        self, requests: Sequence[TokenRequest], max_length: int, batch_size: int, share_contexts: bool = True
    ) -> None:
        self.n = len(requests)
        inputs: list[tuple[int, ...]] = []
        targets: list[tuple[int, ...]] = []
        for ctx, cont in requests:
            if not cont:
                raise PlacementSearchError("a request has an empty continuation")
            full = (tuple(ctx) + tuple(cont))[-(max_length + 1) :]
            inputs.append(full[:-1])
            targets.append(tuple(cont)[-(len(full) - 1) :] if len(cont) >= len(full) else tuple(cont))
        uniq = sorted(set(inputs))
        root = list(range(len(uniq)))
        for i in range(len(uniq) - 2, -1, -1):
            nxt = uniq[i + 1]
            if len(nxt) > len(uniq[i]) and nxt[: len(uniq[i])] == uniq[i]:
                root[i] = root[i + 1]
        roots = sorted({root[i] for i in range(len(uniq))}, key=lambda r: (-len(uniq[r]), uniq[r]))
        slot = {r: k for k, r in enumerate(roots)}
        index = {seq: slot[root[i]] for i, seq in enumerate(uniq)}
        self.sequences = [uniq[r] for r in roots]
        # per request: the root slot, the positions of its predictions and the predicted tokens
        self.items: list[tuple[int, int, tuple[int, ...]]] = []
        for inp, tgt in zip(inputs, targets, strict=True):
            self.items.append((index[inp], len(inp) - len(tgt), tgt))

        # contexts: per root, the prefix through its first predicted position; group the roots by it
        stem_len = [len(s) for s in self.sequences]
        for s, start, _ in self.items:
            stem_len[s] = min(stem_len[s], start + 1)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for s, seq in enumerate(self.sequences):
            groups[seq[: stem_len[s]]].append(s)
        shared = [
            (stem, members)
            for stem, members in groups.items()
            if share_contexts
            and len(members) > 1
            and len(stem) >= max(len(self.sequences[s]) - len(stem) for s in members)
        ]
        shared.sort(key=lambda g: (-len(g[0]), g[0]))  # equal context lengths adjacent: one prefill each
        grouped = {s for _, members in shared for s in members}
        plain = [s for s in range(len(self.sequences)) if s not in grouped]
        self.batches = [plain[i : i + batch_size] for i in range(0, len(plain), batch_size)]
        self._by_batch: list[tuple[torch.Tensor, ...]] = []
        by_slot: dict[int, list[int]] = defaultdict(list)
        for r, (s, _, _) in enumerate(self.items):
            by_slot[s].append(r)
        for batch in self.batches:
            rows, pos, tok, owner = [], [], [], []
            for k, s in enumerate(batch):
                for r in by_slot[s]:
                    _, start, tgt = self.items[r]
                    rows.extend([k] * len(tgt))
                    pos.extend(range(start, start + len(tgt)))
                    tok.extend(tgt)
                    owner.extend([r] * len(tgt))
            self._by_batch.append(tuple(torch.tensor(x, dtype=torch.long) for x in (rows, pos, tok, owner)))
        self.chunks = [self._chunk(shared[i : i + batch_size], by_slot) for i in range(0, len(shared), batch_size)]
        self._device_batches: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    def _chunk(self, groups: list[tuple[tuple[int, ...], list[int]]], by_slot: dict[int, list[int]]) -> _Chunk:
        stems: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        stem_rows: dict[int, list[int]] = defaultdict(list)
        branch_src: list[int] = []
        tails: list[tuple[int, ...]] = []
        branch_slot: list[int] = []
        branches: list[tuple[int, int]] = []  # (group, root slot)
        for g, (stem, members) in enumerate(groups):
            stems[len(stem)].append(stem)
            stem_rows[len(stem)].append(g)
            branches.extend((g, s) for s in members)
        # longest tail first, so the rows still decoding at any step are a prefix of the batch
        branches.sort(key=lambda b: -(len(self.sequences[b[1]]) - len(groups[b[0]][0])))
        for g, s in branches:
            branch_src.append(g)
            tails.append(self.sequences[s][len(groups[g][0]) :])
            branch_slot.append(s)
        steps = len(tails[0])
        ends = sorted({len(t) for t in tails if t})
        segments = []
        for i0, i1 in zip([0, *ends[:-1]], ends, strict=True):
            segments.append((sum(len(t) > i0 for t in tails), i0, i1))
        chunk = _Chunk(dict(stems), dict(stem_rows), branch_src, tails, max(stems) + steps, segments)
        # logits table of a chunk: the contexts' last positions (one row per group), then each segment's decode
        # steps (row-major [row, step]); map each scored token to its row in that table
        offset, base = {}, len(groups)
        for k, i0, i1 in segments:
            offset[i0] = base
            base += k * (i1 - i0)
        where, tok, owner = [], [], []
        for j, s in enumerate(branch_slot):
            g = branch_src[j]
            lc = len(groups[g][0])
            for r in by_slot[s]:
                _, start, tgt = self.items[r]
                for q, t in zip(range(start - lc, start - lc + len(tgt)), tgt, strict=True):
                    if q < 0:  # the context's last position
                        where.append(g)
                    else:
                        i0, i1 = next((a, b) for _, a, b in segments if a <= q < b)
                        where.append(offset[i0] + j * (i1 - i0) + (q - i0))
                    tok.append(t)
                    owner.append(r)
        chunk.gather = tuple(torch.tensor(x, dtype=torch.long) for x in (where, tok, owner))
        return chunk

    @property
    def num_tokens(self) -> int:
        """Tokens fed per placement: whole sequences, each shared context once, and each continuation's steps."""
        total = sum(len(self.sequences[s]) for batch in self.batches for s in batch)
        for c in self.chunks:
            total += sum(len(x) for xs in c.stems.values() for x in xs) + sum(len(t) for t in c.tails)
        return total

    @property
    def batch_shapes(self) -> list[tuple[int, int]]:
        """``(rows, width)`` of each plain batch's right-padded input (what the whole-sequence forward sees)."""
        return [(len(b), max(len(self.sequences[s]) for s in b)) for b in self.batches]

    @property
    def scored_tokens(self) -> int:
        """Continuation tokens scored per placement."""
        return sum(len(t) for _, _, t in self.items)

    def run(
        self, model: Supernet, forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[tuple[float, bool]]:
        """Score every request under ``model``'s current placement; ``forward`` (default ``model``) computes the
        whole-sequence logits of the plain batches (for example :class:`~placement_search.evaluators.graphs.GraphedPrefill`)."""
        return self.collect(self.launch(model, forward))

    @torch.no_grad()
    def launch(
        self, model: Supernet, forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue the scoring of every request on ``model``'s device without waiting for it: per request, the summed
        log-probability (float64) and the count of greedy misses. :meth:`collect` waits and reads them; meanwhile
        the model may switch placement and queue the next run (the queued work already holds its mixers)."""
        device = model.device
        forward = model if forward is None else forward
        logp_sum = torch.zeros(self.n, dtype=torch.float64, device=device)
        misses = torch.zeros(self.n, dtype=torch.long, device=device)

        def add(picked: torch.Tensor, tok: torch.Tensor, owner: torch.Tensor) -> None:
            lp = picked.gather(-1, tok[:, None])[:, 0] - picked.logsumexp(-1)
            logp_sum.index_add_(0, owner, lp.double())
            misses.index_add_(0, owner, (picked.argmax(-1) != tok).long())

        for x, rows, pos, tok, owner in self._batch_tensors(device):
            logits = forward(x)
            add(logits[rows, pos].float(), tok, owner)  # [n_tok, V]
        for c in self.chunks:
            where, tok, owner = (t.to(device) for t in c.gather)
            add(self._run_chunk(model, c)[where].float(), tok, owner)
        return logp_sum, misses

    @staticmethod
    def collect(launched: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[float, bool]]:
        """``(log-likelihood, greedy)`` per request from :meth:`launch`'s tensors (one transfer: the only host sync)."""
        logp_sum, misses = launched
        return [(float(v), bool(m == 0)) for v, m in zip(logp_sum.tolist(), misses.tolist(), strict=True)]

    def _batch_tensors(self, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """Per plain batch: right-padded inputs ``[b, width]`` and the scored rows, positions, tokens and owners,
        built once and kept on ``device`` (they do not depend on the placement; rebuilding them per placement
        cost about 1 s of Python per placement for the shipped dev-supernet pack)."""
        key = str(device)
        cached = self._device_batches.get(key)
        if cached is None:
            cached = []
            for batch, (rows, pos, tok, owner) in zip(self.batches, self._by_batch, strict=True):
                seqs = [self.sequences[s] for s in batch]
                x = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
                for k, seq in enumerate(seqs):
                    x[k, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                cached.append(tuple(t.to(device) for t in (x, rows, pos, tok, owner)))
            self._device_batches = {key: cached}  # one device at a time
        return cached

    @staticmethod
    def _run_chunk(model: Supernet, c: _Chunk) -> torch.Tensor:
        """The chunk's logits table ``[groups + branches * steps, V]`` (see :meth:`_chunk`)."""
        device = model.device
        n_groups = sum(len(v) for v in c.stems.values())
        branches = model.new_cache(len(c.tails), c.max_len)
        src_of = torch.tensor(c.branch_src, dtype=torch.long)
        last: torch.Tensor | None = None
        for length, stems in c.stems.items():
            cache = model.new_cache(len(stems), c.max_len)
            logits = model(torch.tensor(stems, dtype=torch.long, device=device), cache=cache)[:, -1]
            if last is None:
                last = logits.new_empty(n_groups, logits.shape[-1])
            ids = torch.tensor(c.stem_rows[length], dtype=torch.long)
            last[ids.to(device)] = logits
            local = torch.full((n_groups,), -1, dtype=torch.long)
            local[ids] = torch.arange(len(stems))
            dst = (local[src_of] >= 0).nonzero()[:, 0]
            copy_cache_rows(branches, cache, dst.to(device), local[src_of[dst]].to(device))
        assert last is not None
        table = [last]
        for k, i0, i1 in c.segments:  # rows sit at their own positions (cache.pos); ``length`` bounds them all
            x = torch.tensor([t[i0:i1] for t in c.tails[:k]], dtype=torch.long, device=device)
            decoded = model(x, cache=cache_row_prefix(branches, k, max(c.stems) + i0))  # one decode step per token
            table.append(decoded.reshape(-1, decoded.shape[-1]))
        return torch.cat(table)


class RequestEncoder:
    """Turns lm-eval request arguments (strings) into :data:`TokenRequest` lists, the same way everywhere."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        eos = tokenizer.eos_token_id
        if eos is None:
            raise PlacementSearchError("the tokenizer has no EOS token (needed as the first token of every request)")
        self.eos_id = int(eos)

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of ``text`` without special tokens."""
        return tuple(self.tokenizer.encode(text, add_special_tokens=False)) if text else ()

    def loglikelihood(self, context: str, continuation: str) -> TokenRequest:
        """``([eos] + encode(context), encode(continuation))``."""
        return (self.eos_id, *self.encode(context)), self.encode(continuation)

    def rolling(self, text: str) -> list[TokenRequest]:
        """The disjoint rolling windows of ``text`` (lm-eval's, context length 1, after EOS)."""
        windows = get_rolling_token_windows(
            token_list=list(self.encode(text)), prefix_token=self.eos_id, max_seq_len=self.max_length, context_len=1
        )
        return [(tuple(a), tuple(b)) for a, b in map(make_disjoint_window, windows)]


def _progress(iterable: Any, total: int, disable: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, total=total, disable=disable, desc=desc)


class PlacementSearchLM(LM):
    """lm-eval model: one placement of a supernet checkpoint (see the module docstring for the arguments)."""

    def __init__(
        self,
        pretrained: str | os.PathLike[str] | None = None,
        placement: str | Placement | Sequence[str] | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int | str = 16,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        tokenizer: str | os.PathLike[str] | Any | None = None,
        model: Supernet | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device (default cuda) even when model_args name none
            warnings.warn(f"device {device!r} requested but CUDA is not available: using cpu", stacklevel=2)
            device = "cpu"
        if model is None:
            if pretrained is None:
                raise PlacementSearchError("placement-search model: give pretrained=DIR (a checkpoint directory)")
            model = load_supernet(pretrained, device=device, dtype=parse_dtype(dtype, device))
        self.model = model.eval()
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer if tokenizer is not None else pretrained
            if source is None:
                raise PlacementSearchError("placement-search model: give tokenizer= with model=")
            tokenizer = load_tokenizer(Path(source))
        self.tokenizer = tokenizer
        self.placement = parse_placement(placement, self.model)
        self.model.set_placement(self.placement)
        if str(batch_size).startswith("auto"):
            batch_size = 16
        length = int(max_length) if max_length is not None else int(self.model.spec.max_position_embeddings or 4096)
        self.scorer = Scorer(self.model, batch_size=int(batch_size), max_length=length)
        self.encoder = RequestEncoder(tokenizer, length)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> PlacementSearchLM:
        """``key=value,...`` model_args; they take precedence over lm-eval's ``--batch_size``/``--device`` flags."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **args})

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> PlacementSearchLM:
        """As :meth:`create_from_arg_string`, from a parsed dict (what lm-eval's CLI passes)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **dict(arg_dict)})

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def eot_token_id(self) -> int:
        return self.encoder.eos_id

    def tok_encode(self, string: str, **_: Any) -> list[int]:
        return list(self.encoder.encode(string))

    def tok_decode(self, tokens: Sequence[int], **_: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- lm-eval request types ---------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Per request ``(context, continuation)``: (log-probability of the continuation, greedy match)."""
        units = [self.encoder.loglikelihood(*req.args) for req in requests]
        out = self.scorer.score(units)
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Per request ``(text,)``: the summed log-probability of the whole text over rolling windows."""
        windows = [self.encoder.rolling(req.args[0]) for req in requests]
        flat = [w for ws in windows for w in ws]
        scores = self.scorer.score(flat) if flat else []
        out: list[float] = []
        k = 0
        for req, ws in zip(requests, windows, strict=True):
            total = sum(s for s, _ in scores[k : k + len(ws)])
            k += len(ws)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of ``until``; prompts of equal length are batched."""
        jobs: list[tuple[tuple[int, ...], int, list[str]]] = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ctx = (self.eot_token_id, *self.encoder.encode(context))
            ctx = ctx[-max(1, self.max_length - n) :]
            jobs.append((ctx, n, until))
        out = [""] * len(jobs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (ctx, n, _) in enumerate(jobs):
            groups.setdefault((len(ctx), n), []).append(i)
        chunks = [
            (n, idx[s : s + self.batch_size])
            for (_, n), idx in sorted(groups.items())
            for s in range(0, len(idx), self.batch_size)
        ]
        for n, idx in _progress(chunks, len(chunks), disable_tqdm, "generate_until"):
            prompt = torch.tensor([jobs[i][0] for i in idx], dtype=torch.long, device=self.model.device)
            tokens = self.model.generate(prompt, n, eos_token_id=self.eot_token_id)[:, prompt.shape[1] :]
            for i, row in zip(idx, tokens.tolist(), strict=True):
                if self.eot_token_id in row:
                    row = row[: row.index(self.eot_token_id)]
                text = self.tok_decode(row)
                for stop in jobs[i][2]:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


if __name__ != "__main__":
    register_model(MODEL_NAME)(PlacementSearchLM)


def main(argv: Sequence[str] | None = None, cli: Callable[[], None] | None = None) -> None:
    """lm-eval's command line with the ``placement-search`` model registered (``run`` is optional)."""
    import importlib

    importlib.import_module("placement_search.evaluators.lm_eval_model")  # registers under its real name
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    (cli or cli_evaluate)()


if __name__ == "__main__":
    main()
