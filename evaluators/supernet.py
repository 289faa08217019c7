"""The Super Apriel supernet: every mixer of every layer, one active per layer (the placement).

State-dict names follow the supernet checkpoint: ``model.embed_tokens.weight``,
``model.decoder.blocks.{i}.{input_layernorm,post_attention_layernorm}.weight``,
``model.decoder.blocks.{i}.mlp.{gate,up,down}_proj.weight``,
``model.decoder.blocks.{i}.mixer.mixers.{name}.*``, ``model.norm.weight``, ``lm_head.weight``.

A model may be *thin*: only some mixers of each layer are built (``mixers_to_build``); switching to a
mixer that was not built is an error. Parameters are created on the meta device and materialised
directly on ``device``, so the 15B sizes never pass through CPU memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from placement_search import kernels as K
from placement_search.errors import PlacementError
from placement_search.evaluators.cache import Cache, CacheError, StepContext
from placement_search.evaluators.mixers import (
    INIT_STD,
    Mixer,
    RMSNorm,
    Rows,
    build_mixer,
    init_linear_and_conv,
)
from placement_search.placement import Placement
from placement_search.spec import LayerSpec, ModelSpec

PlacementLike = Placement | Sequence[str] | str


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def step(
        self, x: Rows, residual: Rows, norm: RMSNorm | None = None, next_norm: RMSNorm | None = None
    ) -> Rows:
        """``residual + self(x)`` (of ``norm(x)`` when given; ``K.NormedRows`` for ``next_norm`` when given) for one
        decode step: on the Triton path one launch for gate and up (SiLU and the product fused, the norm from the
        previous projection's :class:`~placement_search.kernels.NormedRows`) and one for down with the residual add
        and what the next norm needs fused (:func:`~placement_search.kernels.projection`)."""
        nn_w = None if next_norm is None else next_norm.weight
        if self.gate_proj.bias is not None:
            xs = K.plain_rows(x)
            y = K.plain_rows(residual) + self(xs if norm is None else norm(xs))
            return y if nn_w is None else K.NormedRows(y, nn_w)
        nw, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
        h = K.gated_linear(x, self.gate_proj.weight, self.up_proj.weight, norm_weight=nw, norm_eps=eps)
        return K.linear(h, self.down_proj.weight, residual=residual, next_norm_weight=nn_w)


class MixerChoice(nn.Module):
    """The mixers a layer offers, as ``mixers.<name>``; ``active`` names the one in use."""

    def __init__(self, hidden_size: int, layer: LayerSpec, names: Iterable[str]) -> None:
        super().__init__()
        self.mixers = nn.ModuleDict({name: build_mixer(hidden_size, layer.mixers[name]) for name in names})
        self.active = layer.main_mixer if layer.main_mixer in self.mixers else next(iter(self.mixers))


class Block(nn.Module):
    """``x + mixer(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, hidden_size: int, layer: LayerSpec, names: Iterable[str]) -> None:
        super().__init__()
        if layer.mlp.activation != "silu" or not layer.mlp.gated:
            raise PlacementError("only gated SiLU MLPs are supported")
        self.input_layernorm = RMSNorm(hidden_size, layer.norm_eps)
        self.mixer = MixerChoice(hidden_size, layer, names)
        self.post_attention_layernorm = RMSNorm(hidden_size, layer.norm_eps)
        self.mlp = MLP(hidden_size, layer.mlp.intermediate_size, layer.mlp.add_linear_biases)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: Any = None,
        decode: bool = False,
        ctx: StepContext | None = None,
        next_norm: RMSNorm | None = None,
    ) -> Rows:
        """``x [B, T, d]``; ``positions [T]`` (whole sequence) or ``[B]`` (one decode step, ``T == 1``, with the
        step's shared :class:`StepContext` when the caller has one). A decode step's ``x`` may be
        :class:`~placement_search.kernels.NormedRows` (the previous block's); with ``next_norm`` (the next block's
        input norm, or the final norm) it returns them for that norm."""
        mixer: Mixer = self.mixer.mixers[self.mixer.active]
        if decode:  # the norms ride in the projections around them, the residual adds in the output projections
            x = mixer.step(
                x, positions, cache, ctx, residual=x, norm=self.input_layernorm, next_norm=self.post_attention_layernorm
            )
            return self.mlp_step(x, next_norm)
        x = x + mixer(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def mlp_step(self, x: Rows, next_norm: RMSNorm | None = None) -> Rows:
        """``x + mlp(post_attention_layernorm(x))`` for one decode step ``x [B, 1, d]`` (on the Triton path the norm
        comes from ``x``'s :class:`~placement_search.kernels.NormedRows`, the residual add rides in the down
        projection's epilogue, with what ``next_norm`` needs when given)."""
        return self.mlp.step(x, residual=x, norm=self.post_attention_layernorm, next_norm=next_norm)


def mixers_for(spec: ModelSpec, placements: Iterable[PlacementLike]) -> list[frozenset[str]]:
    """Per layer, the mixer names any of ``placements`` uses (what a thin model must build)."""
    used: list[set[str]] = [set() for _ in range(spec.num_layers)]
    for p in placements:
        for i, name in enumerate(Placement.parse(p, spec.search_space)):
            used[i].add(name)
    return [frozenset(u) for u in used]


class Supernet(nn.Module):
    """Embeddings, ``N`` blocks holding the built mixers, final norm and LM head.

    ``mixers_to_build``: ``None`` for every mixer, or per layer an iterable of names (see :func:`mixers_for`).
    ``seed``: parameters are initialised randomly from it; ``None`` leaves them uninitialised (for loading).
    """

    def __init__(
        self,
        spec: ModelSpec,
        mixers_to_build: Sequence[Iterable[str]] | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        if mixers_to_build is None:
            built = [tuple(layer.mixers) for layer in spec.layers]
        else:
            if len(mixers_to_build) != spec.num_layers:
                raise PlacementError(
                    f"mixers_to_build has {len(mixers_to_build)} layers, expected {spec.num_layers}"
                )
            built = []
            for i, (layer, names) in enumerate(zip(spec.layers, mixers_to_build, strict=True)):
                names = set(names)
                unknown = sorted(names - set(layer.mixers))
                if unknown:
                    raise PlacementError(
                        f"layer {i} has no mixer {unknown[0]!r}; it has {', '.join(layer.mixers)}"
                    )
                if not names:
                    raise PlacementError(f"layer {i}: mixers_to_build is empty")
                built.append(tuple(n for n in layer.mixers if n in names))  # config order
        with torch.device("meta"):
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(spec.vocab_size, d)
            self.model.decoder = nn.Module()
            self.model.decoder.blocks = nn.ModuleList(
                Block(d, layer, names) for layer, names in zip(spec.layers, built, strict=True)
            )
            self.model.norm = RMSNorm(d, spec.head_norm_eps)
            self.lm_head = nn.Linear(d, spec.vocab_size, bias=False)
            self.to(dtype=dtype)
        self.to_empty(device=device)
        self.tie_weights()
        if seed is not None:
            self.init_weights(seed)

    # -- structure ------------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.decoder.blocks

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def built(self) -> tuple[tuple[str, ...], ...]:
        """Per layer, the names of the mixers this model holds."""
        return tuple(tuple(block.mixer.mixers) for block in self.blocks)

    @property
    def placement(self) -> tuple[str, ...]:
        """The active mixer of each layer."""
        return tuple(block.mixer.active for block in self.blocks)

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Random initialisation in place on the model's device (normal 0.02, unit norms, Mamba-style decays)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.model.embed_tokens.weight.normal_(0.0, INIT_STD, generator=g)
        for block in self.blocks:
            block.input_layernorm.reset_parameters()
            block.post_attention_layernorm.reset_parameters()
            init_linear_and_conv(block.mlp, g)
            for mixer in block.mixer.mixers.values():
                mixer.reset_parameters(g)
        self.model.norm.reset_parameters()
        if not self.spec.tie_word_embeddings:
            self.lm_head.weight.normal_(0.0, INIT_STD, generator=g)

    def set_placement(self, placement: PlacementLike) -> tuple[str, ...]:
        """Switch the active mixer of every layer (no reload). Returns the placement as names."""
        names = Placement.parse(placement, self.spec.search_space).mixers
        for i, (name, block) in enumerate(zip(names, self.blocks, strict=True)):
            if name not in block.mixer.mixers:
                raise PlacementError(
                    f"layer {i}: mixer {name!r} was not loaded (thin model holds {', '.join(block.mixer.mixers)})"
                )
        for name, block in zip(names, self.blocks, strict=True):
            block.mixer.active = name
        return names

    def new_cache(self, batch: int, max_len: int) -> Cache:
        """An empty decode cache for the current placement, ``batch`` rows of up to ``max_len`` tokens."""
        specs = [self.spec.mixer(i, name) for i, name in enumerate(self.placement)]
        return Cache(self.placement, specs, batch, max_len, device=self.device, dtype=self.dtype)

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self, input_ids: torch.Tensor, *, cache: Cache | None = None, return_hidden_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, T, V]`` of ``input_ids [B, T]`` under the current placement.

        Without ``cache`` (or with an empty one, which it fills) the sequence starts at position 0.
        With a cache that already holds tokens, the ``T`` tokens are fed one decode step at a time.
        ``return_hidden_states`` adds the ``N + 1`` hidden states ``[B, T, d]``: the embeddings, then the
        output of each block (before the final norm). Gradients are tracked as usual: wrap evaluation
        in ``torch.no_grad()`` (``prefill``, ``decode_step`` and ``generate`` already are).
        """
        if cache is not None and cache.length > 0:
            steps = [
                self._step(input_ids[:, t : t + 1], cache, return_hidden_states)
                for t in range(input_ids.shape[1])
            ]
            logits = torch.cat([s[0] for s in steps], dim=1)
            if not return_hidden_states:
                return logits
            return logits, [torch.cat(hs, dim=1) for hs in zip(*(s[1] for s in steps), strict=True)]
        b, t = input_ids.shape
        if cache is not None:
            cache.check(self.placement, b, t)
        positions = torch.arange(t, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        hidden = [x] if return_hidden_states else []  # kept only on request: N * T * d activations
        for i, block in enumerate(self.blocks):
            x = block(x, positions, None if cache is None else cache.layers[i])
            if return_hidden_states:
                hidden.append(x)
        logits = self.lm_head(self.model.norm(x))
        if cache is not None:
            cache.pos.fill_(t)
            cache.length = t
        return (logits, hidden) if return_hidden_states else logits

    def _step(
        self, token: torch.Tensor, cache: Cache, return_hidden_states: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One decode step: ``token [B, 1]`` at position ``cache.pos``; logits ``[B, 1, V]``.

        Everything on tensors happens in place on ``cache`` with static shapes and no host sync. What the layers
        share (RoPE tables, ring slots, validity masks) is built once for the step in a :class:`StepContext`.
        """
        cache.check(self.placement, token.shape[0], 1)
        ctx = StepContext(cache.pos)
        x = self.model.embed_tokens(token)
        hidden = [x] if return_hidden_states else []
        blocks = list(self.blocks)
        for i, block in enumerate(blocks):
            nxt = blocks[i + 1].input_layernorm if i + 1 < len(blocks) else self.model.norm
            x = block(x, cache.pos, cache.layers[i], decode=True, ctx=ctx, next_norm=nxt)
            if return_hidden_states:
                hidden.append(K.plain_rows(x))
        logits = self.head_step(x)
        cache.pos.add_(1)
        cache.length += 1
        return logits, hidden

    def head_step(self, x: Rows) -> torch.Tensor:
        """Logits of a decode step's last hidden state ``x [B, 1, d]``: final norm and LM head through the decode
        projection (:func:`~placement_search.kernels.projection`: the skinny Triton kernel on CUDA for a few rows,
        the norm from ``x``'s :class:`~placement_search.kernels.NormedRows` when the last block wrote them)."""
        norm = self.model.norm
        return K.linear(x, self.lm_head.weight, self.lm_head.bias, norm_weight=norm.weight, norm_eps=norm.eps)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Fill an empty ``cache`` with ``input_ids [B, T]``; logits ``[B, T, V]``."""
        if cache.length:
            raise CacheError(
                f"prefill needs an empty cache; this one holds {cache.length} tokens (call reset())"
            )
        return self(input_ids, cache=cache)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Feed ``token [B, 1]`` or ``[B]``; logits ``[B, V]`` of the next token. Updates ``cache`` in place."""
        if token.dim() == 1:
            token = token[:, None]
        return self._step(token, cache)[0][:, 0]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Prompt ``[B, T]`` followed by up to ``max_new_tokens`` tokens: ``[B, T + n]``.

        ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the temperature, cut to the
        ``top_k`` most likely and to the smallest set with probability ``>= top_p``, and sampled with a
        generator seeded by ``seed``. Rows that produced ``eos_token_id`` keep emitting it; generation stops
        early once every row has (that check syncs with the host once per token).
        """
        b, t = input_ids.shape
        cache = self.new_cache(b, t + max_new_tokens)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        logits = self.prefill(input_ids, cache)[:, -1]
        out = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_token_id is not None:
                token = torch.where(done, eos_token_id, token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self.decode_step(token, cache)
        return torch.cat(out, dim=1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [B, V]`` (argmax when ``temperature == 0``)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
