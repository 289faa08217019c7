"""A supernet's whole-sequence forward as CUDA graphs, one per (layer, mixer, batch shape), replayed per placement.

An evaluation campaign runs the same few batch shapes (its scoring plan's) under thousands of placements. Eager
PyTorch spends more time in Python and kernel launches than the GPU spends computing for a small model: on the H200
the dev supernet's forward took the same ~0.125 s for a ``[128, 511]`` batch as for ``[15, 82]``
(results/devnet/profile_campaign_h200.json). Here every block (norm, mixer, residual, norm, MLP, residual) under every
mixer its layer holds is captured once per shape; a placement's forward is then the embedding, one graph replay per
layer (the placement's mixer there) and the head, with no per-op launch overhead.

Safety of the shared memory pool: every graph reads a static input buffer and writes a static output buffer, both
allocated outside the pool (a shape's hidden states: one per layer boundary, or two alternating), and keeps nothing
else alive, so the graphs can be replayed in any order (one at a time, on the capturing stream).

The graphs read the parameters where they live: :meth:`GraphedPrefill.load_weights` copies another checkpoint of the
same architecture into them in place, so switching checkpoints needs no new capture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from placement_search.errors import PlacementSearchError
from placement_search.evaluators.supernet import Supernet


class GraphedPrefill:
    """``model(input_ids)`` (no cache) for ``input_ids [B, T]``, under ``model``'s current placement, as one CUDA graph
    replay per layer; shapes not captured yet are captured on first use.

    Prefix reuse: the hidden state entering every layer is kept per shape (``[N + 1, B, T, d]``), so a placement
    that shares its first ``k`` layers with the previous one run on the same input (the same tensor: storage address
    and version, as the scoring plan keeps its batches on the device for its lifetime) starts
    at layer ``k`` (the skipped layers would compute exactly the same values). Evaluating placements in code order
    makes neighbours share prefixes. A shape whose ``N + 1`` states would exceed ``max_state_bytes`` (a 15B model's
    ``d = 5120`` at the dev plan's shapes: ~95 GB) gets two alternating buffers instead, and no reuse.

    Args:
        model: a :class:`Supernet` in eval mode (CUDA for graphs).
        shapes: the ``(B, T)`` batch shapes to capture now.
        graphs: ``True`` (default on CUDA) captures CUDA graphs; ``False`` runs the same per-layer schedule eagerly
            (CPU: tests of the schedule and of prefix reuse).
        reuse_prefix: start at the first layer where the placement differs from the previous one on that input.
        max_state_bytes: the most bytes the kept states of one shape may take (default: a quarter of the free
            device memory when the shape is captured on CUDA; no limit on CPU).
    """

    def __init__(
        self,
        model: Supernet,
        shapes: Iterable[tuple[int, int]] = (),
        *,
        graphs: bool | None = None,
        reuse_prefix: bool = True,
        max_state_bytes: int | None = None,
    ) -> None:
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        if self.graphs and model.device.type != "cuda":
            raise PlacementSearchError(f"CUDA graphs need a CUDA model; this one is on {model.device}")
        self.model = model
        self.reuse_prefix = reuse_prefix
        self.max_state_bytes = max_state_bytes
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.stream = torch.cuda.Stream(device=model.device) if self.graphs else None
        # shape -> (hidden states entering each layer [N + 1, B, T, d] (or 2 alternating), positions [T],
        # per layer {mixer: runner})
        self._runs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, list[dict[str, Callable[[], Any]]]]] = {}
        # shape -> (input identity, placement whose states the buffer holds)
        self._last: dict[tuple[int, int], tuple[tuple[int, int], tuple[str, ...]]] = {}
        self.capture_seconds = 0.0
        self.layers_run = 0
        self.layers_skipped = 0
        for shape in shapes:
            self.capture(shape)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return list(self._runs)

    @property
    def num_graphs(self) -> int:
        return sum(len(layer) for _, _, layers in self._runs.values() for layer in layers) if self.graphs else 0

    @torch.no_grad()
    def capture(self, shape: tuple[int, int]) -> None:
        """Build every (layer, mixer) step for ``input_ids`` of ``shape``: CUDA graphs (after a warm-up outside the
        capture: Triton autotuning, library handles) or eager closures."""
        b, t = (int(v) for v in shape)
        if (b, t) in self._runs:
            return
        t0 = time.perf_counter()
        model = self.model
        n, d = len(model.blocks), model.spec.hidden_size
        state_bytes = (n + 1) * b * t * d * model.dtype.itemsize
        budget = self.max_state_bytes
        if budget is None and model.device.type == "cuda":
            budget = torch.cuda.mem_get_info(model.device)[0] // 4
        keep = self.reuse_prefix and (budget is None or state_bytes <= budget)
        hs = torch.zeros(n + 1 if keep else 2, b, t, d, device=model.device, dtype=model.dtype)
        slot = (lambda i: i) if keep else (lambda i: i % 2)
        positions = torch.arange(t, device=model.device)
        active = model.placement
        layers: list[dict[str, Callable[[], Any]]] = []
        try:
            if not self.graphs:
                for i, block in enumerate(model.blocks):
                    layers.append({name: self._eager_step(block, name, hs[slot(i)], hs[slot(i + 1)], positions)
                                   for name in block.mixer.mixers})  # fmt: skip
            else:
                assert self.stream is not None
                self.stream.wait_stream(torch.cuda.current_stream(model.device))
                with torch.cuda.stream(self.stream):  # warm-up: each mixer once (every layer has the same shapes)
                    seen: set[str] = set()
                    for block in model.blocks:
                        for name in block.mixer.mixers:
                            if name not in seen:
                                seen.add(name)
                                block.mixer.active = name
                                hs[1].copy_(block(hs[0], positions))
                torch.cuda.current_stream(model.device).wait_stream(self.stream)
                for i, block in enumerate(model.blocks):
                    graphs: dict[str, Callable[[], Any]] = {}
                    for name in block.mixer.mixers:
                        block.mixer.active = name
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=self.pool, stream=self.stream):
                            hs[slot(i + 1)].copy_(block(hs[slot(i)], positions))
                        graphs[name] = g.replay  # the bound method keeps the graph alive
                    layers.append(graphs)
        finally:
            model.set_placement(active)
        self._runs[(b, t)] = (hs, positions, layers)
        self.capture_seconds += time.perf_counter() - t0

    @staticmethod
    def _eager_step(
        block: Any, name: str, src: torch.Tensor, dst: torch.Tensor, positions: torch.Tensor
    ) -> Callable[[], Any]:
        def step() -> None:
            active = block.mixer.active
            block.mixer.active = name
            try:
                dst.copy_(block(src, positions))
            finally:
                block.mixer.active = active

        return step

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]``, as ``model(input_ids)``."""
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if shape not in self._runs:
            self.capture(shape)
        hs, _, layers = self._runs[shape]
        model = self.model
        placement = model.placement
        ident = (input_ids.data_ptr(), input_ids._version)
        start = 0
        last = self._last.get(shape)
        if hs.shape[0] == len(layers) + 1 and last is not None and last[0] == ident:
            while start < len(layers) and last[1][start] == placement[start]:
                start += 1
        if start == 0:
            torch.index_select(model.model.embed_tokens.weight, 0, input_ids.reshape(-1), out=hs[0].view(-1, hs.shape[-1]))
        for i in range(start, len(layers)):
            layers[i][placement[i]]()
        self._last[shape] = (ident, placement)
        self.layers_run += len(layers) - start
        self.layers_skipped += start
        return model.lm_head(model.model.norm(hs[len(layers) % hs.shape[0]]))

    @torch.no_grad()
    def load_weights(self, other: Supernet) -> None:
        """Copy ``other``'s parameters (same architecture, mixers and dtype) into the captured model in place."""
        if other.built != self.model.built or other.dtype != self.model.dtype:
            raise PlacementSearchError("the new checkpoint's architecture or dtype differs from the captured model's")
        self.model.load_state_dict(other.state_dict(), strict=True)
        self._last.clear()  # the kept hidden states belong to the old weights
