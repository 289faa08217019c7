"""Linear projections of a decode step: ``x @ W^T`` for a few rows, with the epilogues a block needs.

Ops (pure functions on tensors; ``W`` is ``[N, K]`` as in the checkpoint, ``x`` is ``[..., K]`` and the leading
dimensions hold ``M`` rows in all):

- :func:`linear`: ``x W^T (+ b)``, or ``residual + (x W^T + b)`` with ``residual [..., N]``.
- :func:`gated_linear`: ``silu(x Wg^T) * (x Wu^T)`` (the gated MLP's gate and up projections).
- :func:`linear_pair`: ``[x1 W[:n1]^T | x2 W[n1:]^T]`` (two small projections of two inputs in one launch).

Both take ``norm_weight`` (project ``rms_norm(x, norm_weight)``), and :func:`linear` with a residual takes
``next_norm_weight`` (return :class:`NormedRows`: the sum with what that next RMSNorm needs). Handed from one to the
other on the Triton path, the norm between two projections costs no launch of its own (``FUSE_NORM``); elsewhere it
is :func:`.norm.rms_norm`, then the projection.

Backends:

- ``"torch"``: ``F.linear`` (cuBLAS on CUDA) and the torch ops for the epilogue, each rounded to the activation
  dtype; the reference and the CPU path.
- ``"triton"``: :func:`._projection_triton.skinny_linear_kernel`, one launch per call streaming the weight(s) once
  with the epilogue fused. For ``M <= 16`` rows (decode batches); on CPU tensors only under Triton's interpreter
  (``TRITON_INTERPRET=1``). Optionally split-K (config ``SPLIT > 1``, or ``0`` for :func:`split_for`): each
  column block's K is split over ``SPLIT`` programs, so that a weight of few column blocks still fills whole
  waves of the GPU's SMs (``N = 5120`` at ``BN = 64`` is 80 programs on the H200's 132); the last program of a
  block to arrive sums the fp32 partials (a per-call workspace) in a fixed order and applies the epilogue, with
  a per-device counter buffer (:func:`.backend.arrival_counters`) that every launch leaves at zero.
  Deterministic; it differs from ``SPLIT = 1`` by the fp32 summation order only. On sm_90+ GPUs launched with programmatic dependent launch
  (:func:`.backend.pdl_launch`): a launch may start as the previous kernel's programs exit, and waits for it
  before it reads the activation.
- ``"auto"``: ``"triton"`` on CUDA for bf16/fp16 with ``M <= SKINNY_MAX_ROWS``, no gradient, unit column
  strides and a weight of at least ``SKINNY_MIN_WEIGHT`` elements (checked and timed on the H200 by
  ``benchmarks/bench_projection.py``); ``"torch"`` otherwise.

All paths are CUDA-graph capturable (no host synchronisation).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import SKINNY_MAX_ROWS, arrival_counters, pdl_launch, sm_count, uses_triton
from .norm import rms_norm
from .rope import rope_cache_write


def _triton_module() -> ModuleType:
    return importlib.import_module(f"{__package__}._projection_triton")


#: When set, replaces every default config's ``SPLIT`` (0: :func:`split_for`); for benchmarks comparing split-K
#: settings on the whole decode step (``benchmarks/profile_decode_step.py --split``).
SPLIT_OVERRIDE: int | None = None


#: Under programmatic dependent launch (:func:`.backend.pdl_launch`): 128-byte lines of each weight row of a program
#: (the start of its K range) that it asks L2 for before it waits for the previous kernel, so that the weight
#: stream would start during that kernel's tail (0: none; a power of two). Off: on the H200 every prefetch made the
#: whole step slower (all-SWA batch 1: 8.21 ms without, 8.26 with 4 lines, 8.34 with 8;
#: results/decode_step_ab_h200.json), the lines being fetched again by the main loop.
PDL_PREFETCH_LINES = 0


#: Whether the Triton path folds the RMSNorm between two projections into them (no launch of its own): the one
#: that adds the residual also writes ``round(h * g)`` and the rows' sums of squares (``next_norm_weight``:
#: :class:`NormedRows`), the one after scales its product (``norm_weight``). False: the Triton RMSNorm kernel runs
#: before the second projection (to compare: ``benchmarks/ab_decode_step.py`` variant ``+unorm``).
FUSE_NORM = True


#: Split-K tiles for the output projections and the MLP down projection ([5120, 4096 / 14336]): 32 x 128 tiles, 4
#: stages, 2 K ranges. The split-K sweep (results/projection_splitk_h200.json, 2026-11-29) timed them at 41.9 / 42.3
#: us (MLP down, batch 1 / 16) against 44.4 / 44.8 with the unsplit 64 x 256 tiles, o_proj 15.1 / 15.7 against
#: 16.8 / 16.7; the whole 15B step 1.0-1.5% faster (results/decode_step_profile_splitk_h200.json). False: the
#: unsplit tiles (to compare).
SPLIT_K_OUTPUT_PROJECTIONS = True
#: Their K ranges: 2, the sweep's choice at batch 1 and 16; on the whole step 3 came within -0.2% (batch 1) and +0.3%
#: (B = 16), 4 slower at both (results/decode_step_ab_os_h200.json).
OUTPUT_SPLIT = 2
#: Tile settings (``BN``, ``BK``, ``STAGES``, ``SPLIT``, ``num_warps``) replacing the defaults of one projection
#: role (benchmarks: ``ab_decode_step.py``'s tile knobs): ``"gated"`` (the MLP's gate/up), ``"mixer_output"`` (the
#: mixers' output projections [5120, 4096]), ``"mlp_down"``, ``"input"`` (the mixers' packed input projections),
#: ``"lm_head"``, ``"rope"`` (:func:`linear_rope_cache`'s :data:`ROPE_CONFIG`; ``BN`` in column pairs). On the H200
#: the mixers' output projections on 16 columns unsplit, 64 in 4 K ranges or 16 in 2 came within -0.25% to +2.5% of
#: the defaults on the whole step (results/decode_step_ab_otiles_h200.json), the input projections on 64 columns
#: within -0.23% / +0.2% (decode_step_ab_itiles_h200.json): none kept.
TILE_OVERRIDES: dict[str, dict[str, int]] = {}
#: Which projections get the output projections' tiles: False (the default), every projection that adds a residual
#: (the mixers' output projections [5120, 4096] and the MLP down projection); True, the rule of sessions 6-9, by
#: shape (``N <= K``), which left the output projections ([5120, 4096]: N > K) on the q/k/v tiles (to compare:
#: ``benchmarks/ab_decode_step.py`` variant ``+oshape``).
RESIDUAL_TILES_BY_SHAPE = False


def skinny_config(n: int, k: int, gated: bool, residual: bool = False) -> dict[str, int]:
    """Tile sizes and pipeline depth for an ``[N, K]`` weight (``residual``: its product is added to the residual
    stream, as a block's output projections are): ``BN`` output columns per program, ``BK`` per pipeline stage,
    ``STAGES`` loads in flight, ``SPLIT`` K ranges per column block (1: no split-K; 0: chosen by :func:`split_for`
    for the device's SM count). Chosen from the sweeps of ``benchmarks/bench_projection.py`` on the H200
    (results/projection_kernels_h200.json; split-K: results/projection_splitk_h200.json) at the 15B shapes, batch 1
    and 16. ``SPLIT_OVERRIDE``, ``SPLIT_K_OUTPUT_PROJECTIONS`` and ``RESIDUAL_TILES_BY_SHAPE`` change the defaults
    (benchmarks)."""
    role, cfg = _skinny_config(n, k, gated, residual)
    cfg.update(TILE_OVERRIDES.get(role, {}))
    if SPLIT_OVERRIDE is not None:
        cfg["SPLIT"] = SPLIT_OVERRIDE
    return cfg


def _skinny_config(n: int, k: int, gated: bool, residual: bool) -> tuple[str, dict[str, int]]:
    """The projection's role (the keys of ``TILE_OVERRIDES``) and its default tiles."""
    if gated:  # MLP gate + up [14336, 5120] x 2: 64 columns a program (224 programs, three per SM): the whole step
        # 0.2-0.4% faster than with 32 (448, five per SM; 76.6 us alone, cuBLAS + SiLU + product 83.8) at batch 1 and
        # 16, bit-equal (results/decode_step_ab_gtiles_h200.json, decode_step_ab_itiles_h200.json)
        return "gated", {"BN": 64, "BK": 128, "STAGES": 3, "num_warps": 4, "SPLIT": 1}
    if n >= 65536:  # LM head [131072, 5120]: 306 us (cuBLAS 378)
        return "lm_head", {"BN": 64, "BK": 256, "STAGES": 3, "num_warps": 4, "SPLIT": 1}
    output = n <= k if RESIDUAL_TILES_BY_SHAPE else residual
    if n <= 8192 and k <= 16384 and output:  # output projections, MLP down [5120, 4096 / 14336]
        role = "mixer_output" if k <= 8192 else "mlp_down"
        if SPLIT_K_OUTPUT_PROJECTIONS:
            return role, {"BN": 32, "BK": 128, "STAGES": 4, "num_warps": 4, "SPLIT": OUTPUT_SPLIT}
        return role, {"BN": 64, "BK": 256, "STAGES": 5, "num_warps": 8, "SPLIT": 1}
    if n <= 8192:  # attention q/k/v packed [6144, 5120]
        return "input", {"BN": 32, "BK": 256, "STAGES": 5, "num_warps": 4, "SPLIT": 1}
    # GDN / KDA packed inputs [10304 / 12576, 5120]: four stages in flight, not five (as the sweep chose alone): whole
    # 32K step 0.07-0.41% faster for all-GDN, 0.29-0.36% for all-KDA at batch 1 and 16 on two machines, bit-equal;
    # three, six or eight stages slower (results/decode_step_ab_istages_h200.json, decode_step_ab_stages_h200.json)
    return "input", {"BN": 32, "BK": 128, "STAGES": 4, "num_warps": 4, "SPLIT": 1}


#: The most 128-byte lines of an ``l2_prefetch`` tensor one program of the skinny kernel asks L2 for (more: the
#: tensor is not prefetched; 4096 lines of 128 programs are 64 MB, more than the H200's L2 holds).
PREFETCH_MAX_LINES = 4096


def prefetch_lines(t: Tensor | None, programs: int) -> int:
    """Lines of ``t`` each of ``programs`` programs asks L2 for so that together they cover it (a power of two,
    for ``tl.arange``); 0 when there is nothing to prefetch, ``t`` is not contiguous or would need more than
    :data:`PREFETCH_MAX_LINES` a program."""
    if t is None or t.numel() == 0 or not t.is_contiguous() or programs < 1:
        return 0
    lines = -(-t.numel() * t.element_size() // 128)
    per = 1 << (-(-lines // programs) - 1).bit_length()
    return per if per <= PREFETCH_MAX_LINES else 0


def split_for(n: int, k: int, bn: int, sms: int = 132, *, bk: int = 1, min_k: int = 1024) -> int:
    """A split-K factor for ``cdiv(n, bn)`` column blocks over ``k``: the smallest ``SPLIT`` whose
    ``cdiv(n, bn) * SPLIT`` programs are at least two waves of ``sms`` and fill at least 90% of their last
    wave (the best-filled such count if none reaches 90%), with every split at least ``min_k`` of K and, given the
    kernel's ``bk``, none left empty by the rounding of the splits to whole ``bk`` steps; where no split reaches two
    waves, the largest allowed. On the H200 (132 SMs): ``n = 5120, k = 4096, bn = 64`` (80 blocks) gives 4 (320
    programs, the only count of two waves), ``n = 5120, k = 14336, bn = 64`` gives 6 (480 programs: 3.6 waves, 91%),
    ``n = 10240, k = 5120, bn = 32`` gives 2 (640: 4.85 waves, 97%), the LM head's 2048 blocks of 64 keep 1."""

    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    blocks = cdiv(n, bn)
    cands: list[tuple[int, int, float]] = []  # (split, programs, fill of the waves)
    for split in range(1, max(1, k // min_k) + 1):
        chunk = cdiv(cdiv(k, split), bk) * bk  # as the kernel splits
        if split > 1 and (split - 1) * chunk >= k:  # the last split would be empty
            continue
        programs = blocks * split
        cands.append((split, programs, programs / (cdiv(programs, sms) * sms)))
    enough = [c for c in cands if c[1] >= 2 * sms]
    if not enough:
        return cands[-1][0]
    good = [c for c in enough if c[2] >= 0.9]
    if good:
        return good[0][0]
    return max(enough, key=lambda c: (c[2], -c[0]))[0]


#: ``"auto"`` leaves weights smaller than this (elements) to cuBLAS: a 1-8 MB read is launch-bound, where cuBLAS's
#: split-K kernels beat one program per column block (k/v_proj [1024, 5120]: 8.3 us vs 12.0).
SKINNY_MIN_WEIGHT = 1 << 22


@dataclass(frozen=True)
class NormedRows:
    """Rows ``x [..., K]`` (a block's residual stream between two projections) and what the RMSNorm of weight
    ``weight`` after them needs on the Triton path, written by the projection that produced ``x``
    (:func:`linear` with ``next_norm_weight``): ``xg = round(x * weight)`` and ``partial_sumsq`` (fp32
    ``[blocks, SKINNY_MAX_ROWS]``: the rows' sums of squares by column block of ``x``, rows in flattened order).
    ``xg`` and ``partial_sumsq`` are None where the producer took another path (torch, or ``FUSE_NORM`` off); a
    projection given these rows with ``norm_weight=weight`` then runs the norm first. Indexing applies to ``x`` and
    ``xg`` and may only add or drop unit dimensions (``rows[:, 0]``, ``rows[:, None]``)."""

    x: Tensor
    weight: Tensor | None = None
    xg: Tensor | None = None
    partial_sumsq: Tensor | None = None

    def __getitem__(self, idx: Any) -> NormedRows:
        x = self.x[idx]
        if x.shape[-1] != self.x.shape[-1] or x.numel() != self.x.numel():
            raise IndexError(f"NormedRows indexing may only add or drop unit dimensions, not {idx!r}")
        return NormedRows(x, self.weight, None if self.xg is None else self.xg[idx], self.partial_sumsq)

    @property
    def sumsq(self) -> Tensor | None:
        """The rows' sums of squares, fp32 ``x.shape[:-1]`` (from ``partial_sumsq``; None without them)."""
        if self.partial_sumsq is None:
            return None
        return self.partial_sumsq.sum(0)[: self.x[..., 0].numel()].view(self.x.shape[:-1])


def plain_rows(x: Tensor | NormedRows) -> Tensor:
    """The rows themselves (``x.x`` of :class:`NormedRows`)."""
    return x.x if isinstance(x, NormedRows) else x


def _launch(
    x: Tensor | NormedRows,
    w: Tensor,
    w2: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    config: dict[str, int] | None,
    norm_weight: Tensor | None = None,
    norm_eps: float = 0.0,
    next_norm_weight: Tensor | None = None,
    pair: tuple[int, int] | None = None,
    l2_prefetch: Tensor | None = None,
    rope: dict[str, Any] | None = None,
) -> Tensor | NormedRows:
    """One launch of the skinny kernel; ``pair = (n1, x2_off)``: columns from ``n1`` on read the rows at ``x2_off``
    elements from ``x``'s (``GROUPED``, :func:`linear_pair`); ``l2_prefetch``: see :func:`linear`; ``rope``: the
    ``ROPE`` epilogue's arguments (:func:`linear_rope_cache`), the output then being the rotated queries only."""
    n, k = w.shape
    w, w2, bias = (None if t is None else t if t.stride(-1) == 1 else t.contiguous() for t in (w, w2, bias))
    rows = x if isinstance(x, NormedRows) else NormedRows(x)
    lead = rows.x.shape[:-1]
    ss = None
    if norm_weight is not None and FUSE_NORM and rows.xg is not None and rows.weight is norm_weight:
        x2, ss = rows.xg.reshape(-1, k), rows.partial_sumsq  # the producer's round(x * g) and sums of squares
    elif norm_weight is not None:
        x2 = rms_norm(rows.x.reshape(-1, k), norm_weight, norm_eps, backend="triton")
    else:
        x2 = rows.x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, rope["nq"] if rope else n), dtype=x2.dtype, device=x2.device)
    r2 = out
    if residual is not None:
        r2 = residual.reshape(m, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    gated = w2 is not None
    cfg = dict(config or skinny_config(n, k, gated, residual is not None))
    warps = cfg.pop("num_warps", 4)
    split = int(cfg.pop("SPLIT", 1))
    if split < 0:
        raise ValueError(f"SPLIT must be >= 0 (0: automatic), got {split}")
    if split == 0:
        split = split_for(n, k, cfg["BN"], sm_count(x2.device), bk=cfg["BK"])
    blocks = -(-(n // 2 if rope else n) // cfg["BN"])  # ROPE: a program owns BN column pairs
    produce = next_norm_weight is not None and residual is not None and FUSE_NORM
    ws = locks = out  # SPLIT = 1 reads neither (the kernel still takes a pointer for each)
    if split > 1:  # fp32 partial products (from the graph's pool under capture) and the per-block counters
        ws_shape = (split, blocks, 2 if gated else 1, m, cfg["BN"])
        ws = torch.empty(ws_shape, dtype=torch.float32, device=x2.device)
        locks = arrival_counters(x2.device, blocks)
    launch: dict[str, Any] = pdl_launch(x2.device)
    if launch and PDL_PREFETCH_LINES:
        launch["PREFETCH"] = PDL_PREFETCH_LINES
    if ss is not None:
        nss = ss.shape[0]
        launch.update(NORM=True, ss_ptr=ss, nss=nss, SSB=1 << max(nss - 1, 0).bit_length(), eps=float(norm_eps))
    if pair is not None:
        launch.update(GROUPED=True, n1=pair[0], x2_off=pair[1])
    if rope is not None:
        launch.update(ROPE=True, **rope)
        w2 = w  # the second accumulator streams the heads' second halves of the same weight
    lines = prefetch_lines(l2_prefetch, blocks * split) if x2.device.type == "cuda" else 0
    if lines:
        launch.update(pf_ptr=l2_prefetch, pf_n=l2_prefetch.numel(), PF_ELEMS=128 // l2_prefetch.element_size(),
                      PF_LINES=lines)  # fmt: skip
    if produce:
        hg = torch.empty_like(out)
        ssp = torch.empty((blocks, SKINNY_MAX_ROWS), dtype=torch.float32, device=x2.device)
        launch.update(NORM_OUT=True, gn_ptr=next_norm_weight.contiguous(), hg_ptr=hg, s_hg=hg.stride(0), ssp_ptr=ssp)
    _triton_module().skinny_linear_kernel[(blocks, split)](
        x2, x2.stride(0), w, w.stride(0), w if w2 is None else w2, w.stride(0) if w2 is None else w2.stride(0),
        w if bias is None else bias, r2, r2.stride(0), out, out.stride(0), ws, locks, m, n, k,
        BM=SKINNY_MAX_ROWS, SPLIT=split, GATED=gated, RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BK"] == 0, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps, **cfg, **launch,
    )  # fmt: skip
    y = out.view(*lead, out.shape[-1])
    if next_norm_weight is None:
        return y
    if not produce:
        return NormedRows(y, next_norm_weight)
    return NormedRows(y, next_norm_weight, hg.view(*lead, n), ssp)


def _torch_rows(x: Tensor | NormedRows, norm_weight: Tensor | None, norm_eps: float, backend: str) -> Tensor:
    """The activation of the non-Triton path: the rows, RMS-normalised when ``norm_weight`` is given."""
    x = plain_rows(x)
    if norm_weight is None:
        return x
    return rms_norm(x, norm_weight, norm_eps, backend="torch" if backend == "torch" else "auto")


def linear(
    x: Tensor | NormedRows,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    residual: Tensor | NormedRows | None = None,
    norm_weight: Tensor | None = None,
    norm_eps: float = 1e-5,
    next_norm_weight: Tensor | None = None,
    backend: str = "auto",
    config: dict[str, int] | None = None,
    l2_prefetch: Tensor | None = None,
) -> Tensor | NormedRows:
    """``x W^T`` (``+ residual``), of ``rms_norm(x, norm_weight, norm_eps)`` when ``norm_weight`` is given.

    Args:
        x: ``[..., K]`` activations (``M`` rows in all), or :class:`NormedRows` (from a projection given
            ``next_norm_weight=norm_weight``: on the Triton path the norm then costs no launch of its own).
        weight: ``[N, K]``.
        bias: optional ``[N]``, added before the rounding (as ``F.linear``).
        residual: optional ``[..., N]`` (or :class:`NormedRows`), added after the product is rounded to the
            activation dtype.
        norm_weight: optional ``[K]``: the rows are RMS-normalised first (:func:`.norm.rms_norm`); on the Triton
            path from ``x``'s :class:`NormedRows` when they carry this weight's (one rounding of the normalised
            row fewer, see :mod:`._projection_triton`), else by the Triton norm kernel first.
        norm_eps: added to the mean square (with ``norm_weight``).
        next_norm_weight: optional ``[N]``, with ``residual``: the weight of the RMSNorm the result goes through
            next; the result is then :class:`NormedRows`, whose ``xg`` and ``sumsq`` the Triton path fills in the
            same launch (``FUSE_NORM``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring).
        config: Triton tile sizes (``BN``, ``BK``, ``STAGES``, ``num_warps``, optional ``SPLIT``: K ranges per
            column block, 1 when absent, 0 for :func:`split_for`'s choice); default :func:`skinny_config`.
        l2_prefetch: optional contiguous tensor a later kernel reads (a GDN/KDA layer's recurrent state): on the
            Triton path on CUDA each program asks L2 for its share of it once past its main loop
            (:func:`prefetch_lines`), so that its bytes stream while the launch's tail runs. A hint: the result is
            the same bit for bit; the other paths ignore it.

    Returns:
        ``[..., N]`` in ``x.dtype``; :class:`NormedRows` of it with ``next_norm_weight``.
    """
    res = None if residual is None else plain_rows(residual)
    ws = tuple(t for t in (weight, bias, norm_weight, next_norm_weight) if t is not None)
    if uses_triton(plain_rows(x), ws, backend) and (backend == "triton" or weight.numel() >= SKINNY_MIN_WEIGHT):
        return _launch(x, weight, None, bias, res, config, norm_weight, norm_eps, next_norm_weight,
                       l2_prefetch=l2_prefetch)  # fmt: skip
    y = F.linear(_torch_rows(x, norm_weight, norm_eps, backend), weight, bias)
    y = y if res is None else res + y
    return y if next_norm_weight is None else NormedRows(y, next_norm_weight)


#: Tiles of :func:`linear_rope_cache` (``BN``: column pairs a program, i.e. ``2 BN`` weight rows; fewer where half a
#: head holds fewer; ``TILE_OVERRIDES["rope"]`` replaces them). On the H200, whole 32K decode step against the two
#: launches (projection, then RoPE and the cache write): 32 pairs (96 programs of 64 rows) take 0.9% off all-SWA at
#: batch 1 and 16, 0.8% / 0.3% off all-attention, 0.3% / 0.2% off mixed, logits bit-equal where SDPA is
#: deterministic (results/decode_step_ab_ropetiles_h200.json, decode_step_ab_ropetiles2_h200.json); 16 pairs (the
#: unfused projection's 32 rows a program) made them 0.6-3.4% slower, 32 pairs on 128-wide K steps 0.5-0.6% faster
#: (decode_step_ab_rope_h200.json). Four stages in flight (120 KiB of shared memory a program) instead of five:
#: 0.03-0.13% faster in all 12 cells of two A/B runs (all-attention, all-SWA, mixed at batch 1 and 16); three or six
#: stages, or 128-wide K steps with five or eight, 0.1-0.9% slower (decode_step_ab_ropestages*_h200.json, session 15).
ROPE_CONFIG = {"BN": 32, "BK": 256, "STAGES": 4, "num_warps": 4}


def rope_fits(weight: Tensor, heads: int, kv_heads: int, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether :func:`linear_rope_cache` takes these tensors: a ``[(heads + 2 kv_heads) * D, K]`` weight of unit
    column stride, caches ``[B, S, kv_heads, D]`` alike in dtype and strides with unit stride over ``D``, half of
    ``D`` a multiple of 16 (the fewest column pairs a program of the default tiles takes)."""
    d = k_cache.shape[-1]
    return (
        k_cache.dim() == 4
        and k_cache.shape[2] == kv_heads
        and weight.shape[0] == (heads + 2 * kv_heads) * d
        and weight.stride(-1) == 1
        and k_cache.shape == v_cache.shape
        and k_cache.stride() == v_cache.stride()
        and k_cache.dtype == v_cache.dtype
        and k_cache.stride(-1) == 1
        and d % 32 == 0
    )


def rope_tiles(head_dim: int) -> dict[str, int]:
    """The tiles :func:`linear_rope_cache` launches with by default for heads of ``head_dim``: :data:`ROPE_CONFIG`
    (with any ``TILE_OVERRIDES["rope"]``), ``BN`` column pairs halved until they divide ``head_dim / 2`` (small
    heads, the tests': fewer pairs a program; not below 16)."""
    config = {**ROPE_CONFIG, **TILE_OVERRIDES.get("rope", {})}
    while (head_dim // 2) % config["BN"] and config["BN"] > 16:
        config["BN"] //= 2
    return config


def linear_rope_cache(
    x: Tensor | NormedRows,
    weight: Tensor,
    heads: int,
    kv_heads: int,
    cos: Tensor,
    sin_signed: Tensor,
    slot: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    norm_weight: Tensor | None = None,
    norm_eps: float = 1e-5,
    backend: str = "auto",
    config: dict[str, int] | None = None,
) -> Tensor:
    """An attention layer's decode input projection, RoPE and KV-cache write: on the Triton path one launch (the
    ``ROPE`` epilogue), computing what :func:`linear` of the packed ``[q | k | v]`` weight followed by
    :func:`.rope.rope_cache_write` computes, with the same roundings (the products rounded to the activation dtype,
    then rotated in fp32 and rounded again); on the torch path those two calls.

    Args:
        x: ``[B, K]`` rows (or :class:`NormedRows`; ``B <= SKINNY_MAX_ROWS``), CUDA or the interpreter.
        weight: ``[(H + 2 HKV) * D, K]``, the q, k and v projections stacked.
        heads, kv_heads: ``H`` and ``HKV``.
        cos, sin_signed: the step's tables (:func:`.rope.rope_step_tables`: ``[B, 1, 1, D]`` fp32).
        slot: LongTensor ``[B]``, each row's cache slot.
        k_cache, v_cache: ``[B, S, HKV, D]`` (:func:`rope_fits`), written at ``[b, slot[b]]``.
        norm_weight, norm_eps: as in :func:`linear`.
        backend: as in :func:`linear` (``"auto"``: Triton where :func:`linear` would take it).
        config: Triton tiles as in :func:`linear` (``BN``: column pairs per program; default :func:`rope_tiles`).

    Returns:
        The rotated queries ``[B, 1, H, D]`` (the layout :func:`.attention.attention_decode` takes).
    """
    d = k_cache.shape[-1]
    if not rope_fits(weight, heads, kv_heads, k_cache, v_cache):
        raise ValueError(
            f"linear_rope_cache: weight {tuple(weight.shape)} and caches {tuple(k_cache.shape)} / "
            f"{tuple(v_cache.shape)} do not fit {heads} heads over {kv_heads} KV heads"
        )
    if config is not None and (d // 2) % config["BN"]:
        raise ValueError(f"linear_rope_cache: {config['BN']} column pairs a program do not divide half of head size {d}")
    k = weight.shape[1]
    ws = (weight,) if norm_weight is None else (weight, norm_weight)
    if not (uses_triton(plain_rows(x), ws, backend) and (backend == "triton" or weight.numel() >= SKINNY_MIN_WEIGHT)):
        y = linear(x, weight, norm_weight=norm_weight, norm_eps=norm_eps, backend=backend)
        b = y.shape[0]
        q, kk, v = (t.view(b, -1, d) for t in y.split([heads * d, kv_heads * d, kv_heads * d], dim=-1))
        rope_backend = "torch" if backend == "torch" else "auto"
        return rope_cache_write(q, kk, v, cos, sin_signed, k_cache, v_cache, slot, backend=rope_backend)
    if config is None:
        config = rope_tiles(d)
    b = plain_rows(x).reshape(-1, k).shape[0]
    cos2, sin2 = cos.reshape(b, d), sin_signed.reshape(b, d)
    rope = {"HD": d, "nq": heads * d, "nk": kv_heads * d, "cos_ptr": cos2, "sin_ptr": sin2, "s_tab": cos2.stride(0),
            "slot_ptr": slot, "kc_ptr": k_cache, "vc_ptr": v_cache, "s_cb": k_cache.stride(0),
            "s_cs": k_cache.stride(1), "s_ch": k_cache.stride(2)}  # fmt: skip
    q = _launch(x, weight, None, None, None, {**config, "SPLIT": 1}, norm_weight, norm_eps, rope=rope)
    return q.view(b, 1, heads, d)


#: Tiles of :func:`linear_pair` on the Triton path: KDA's ``f_b`` / ``g_b`` ``[4096, 128]`` each, one K step.
PAIR_CONFIG = {"BN": 32, "BK": 128, "STAGES": 2, "num_warps": 4, "SPLIT": 1}


def linear_pair(
    x1: Tensor,
    x2: Tensor,
    weight: Tensor,
    n1: int,
    *,
    backend: str = "auto",
    config: dict[str, int] | None = None,
) -> Tensor:
    """``[x1 W[:n1]^T | x2 W[n1:]^T]``: two projections of two inputs of the same rows, in one launch.

    For two small projections side by side in a decode step (KDA's low-rank gate up-projections ``f_b`` and ``g_b``,
    ``[4096, 128]`` each, stacked): on the Triton path one launch of the skinny kernel, whose programs of the columns
    from ``n1`` on read ``x2`` (``GROUPED``), where two cuBLAS calls are two launches that programmatic dependent
    launch cannot overlap. The Triton path takes it whatever the weight's size (the ``"auto"`` rule of
    ``SKINNY_MIN_WEIGHT`` is for one projection against one cuBLAS call).

    Args:
        x1, x2: ``[..., K]`` each, the same shape. On the Triton path two views of one buffer with the same strides
            (column slices of one projection's output, as KDA's ``f_a`` / ``g_a``) are read in place; other pairs
            are copied into one buffer first.
        weight: ``[N, K]``: rows ``:n1`` for ``x1``, the rest for ``x2``.
        n1: ``0 < n1 < N``.
        backend, config: as for :func:`linear` (default tiles: ``PAIR_CONFIG``; ``n1`` must be a multiple of their
            ``BN`` on the Triton path).

    Returns:
        ``[..., N]`` in ``x1.dtype``, each product rounded to it (as two :func:`linear` calls).
    """
    n, k = weight.shape
    if x1.shape != x2.shape or x1.shape[-1] != k or not 0 < n1 < n:
        raise ValueError(
            f"linear_pair needs x1, x2 [..., {k}] of one shape and 0 < n1 < {n}; "
            f"got {tuple(x1.shape)}, {tuple(x2.shape)}, n1={n1}"
        )
    cfg = dict(config or PAIR_CONFIG)
    if backend == "triton" and n1 % cfg["BN"]:
        raise ValueError(f"linear_pair on the Triton path needs n1 ({n1}) to be a multiple of BN ({cfg['BN']})")
    if uses_triton(x1, (weight,), backend) and n1 % cfg["BN"] == 0:
        lead = x1.shape[:-1]
        a, b = x1.reshape(-1, k), x2.reshape(-1, k)  # views where the strides allow, which is checked next
        off, rem = divmod(b.data_ptr() - a.data_ptr(), a.element_size())
        if b.dtype != a.dtype or b.stride() != a.stride() or a.stride(-1) != 1 or rem or not _one_buffer(a, b):
            both = torch.cat([a, b], dim=-1)
            a, off = both[:, :k], k
        y = _launch(a, weight, None, None, None, cfg, pair=(n1, off))
        return y.view(*lead, n)
    return torch.cat([F.linear(x1, weight[:n1]), F.linear(x2, weight[n1:])], dim=-1)


def _one_buffer(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of one allocation (the kernel reads ``b`` at an offset from ``a``)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def gated_linear(
    x: Tensor | NormedRows,
    gate_weight: Tensor,
    up_weight: Tensor,
    *,
    norm_weight: Tensor | None = None,
    norm_eps: float = 1e-5,
    backend: str = "auto",
    config: dict[str, int] | None = None,
) -> Tensor:
    """``silu(x Wg^T) * (x Wu^T)`` (of ``rms_norm(x, norm_weight, norm_eps)`` when ``norm_weight`` is given).

    Args:
        x: ``[..., K]`` or :class:`NormedRows`.
        gate_weight, up_weight: ``[N, K]`` each.
        norm_weight, norm_eps, backend, config: as for :func:`linear`.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    if gate_weight.shape != up_weight.shape:
        raise ValueError(f"gate weight {tuple(gate_weight.shape)} and up weight {tuple(up_weight.shape)} differ")
    ws = (gate_weight, up_weight) if norm_weight is None else (gate_weight, up_weight, norm_weight)
    if uses_triton(plain_rows(x), ws, backend) and (backend == "triton" or gate_weight.numel() >= SKINNY_MIN_WEIGHT):
        return _launch(x, gate_weight, up_weight, None, None, config, norm_weight, norm_eps)
    h = _torch_rows(x, norm_weight, norm_eps, backend)
    return F.silu(F.linear(h, gate_weight)) * F.linear(h, up_weight)
