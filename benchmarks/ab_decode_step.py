"""A/B of launch settings on the whole-model decode step: the same model, cache and step captured once per variant.

The variants are module settings read at launch time, so one CUDA graph per variant is captured from the same
model and cache and replayed in turn (rounds of all variants, ``--rounds`` times, so a drift of the machine shows
as a spread rather than as a difference between variants):

- ``nopdl``: every kernel waits for its predecessor (``kernels.backend.PDL = False``);
- ``pdl``: programmatic dependent launch of our Triton kernels, no weight prefetch
  (``kernels.projection.PDL_PREFETCH_LINES = 0``);
- ``pdl_pf<N>``: PDL, and each projection program asks L2 for the first ``N`` 128-byte lines of its weight rows
  before it waits;
- ``pdl_early`` (``_pf<N>``): the same with each kernel's dependents launched right after its own wait;
- ``pdl_late`` (``_pf<N>``): the same with each kernel's dependents launched once its programs are past their main
  work (``kernels.backend.PDL_TRIGGER = "late"``);
- any of these with ``+tattn`` (attention decode through the Triton split-K kernel, not SDPA) or ``+grouped``
  (SDPA over the query heads of each KV head as rows, ``sdpa_grouped``), and/or ``+stream`` (streaming cache hints
  on the GDN/KDA recurrent state), and/or ``+unorm`` (the RMSNorms as kernels of their own before the projections,
  not folded into the projections around them: ``kernels.projection.FUSE_NORM = False``), and/or ``+gates2`` (KDA's
  two low-rank gate up-projections as two cuBLAS calls, not one ``linear_pair`` launch:
  ``evaluators.mixers.PAIRED_GATE_PROJECTIONS = False``), ``+bv<N>`` (``N`` value columns per program of the
  GDN/KDA state kernels from 16 rows up: ``kernels.fused_decode.BLOCK_V``; ``+pc<N>``: the GDN/KDA conv step as a
  launch of its own from ``N`` rows up, ``kernels.fused_decode.PRECONV_MIN_ROWS``; ``+sr<N>``: at most ``N``
  registers a thread in the GDN/KDA state kernels, ``kernels.fused_decode.STATE_MAX_REGISTERS``; ``+os<N>``: K
  ranges of the output and MLP down projections, ``kernels.projection.OUTPUT_SPLIT``; ``+ob<N>``, ``+og<N>``,
  ``+ok<N>``, ``+ow<N>``: the mixers' output projections' columns per program, stages, K ranges and warps alone;
  ``+gb<N>``, ``+gk<N>``, ``+gs<N>``, ``+gw<N>``: the MLP gate/up's columns, K step, stages and warps;
  ``+ib<N>``, ``+ik<N>``, ``+is<N>``, ``+iw<N>``: the same for the mixers' input projections, ``+rb<N>``,
  ``+rk<N>``, ``+rs<N>``, ``+rw<N>`` for the attention layers' fused q/k/v + RoPE projection (column pairs, K step,
  stages, warps; ``kernels.projection.TILE_OVERRIDES``); ``+tb<N>``, ``+ts<N>``, ``+tw<N>``,
  ``+tp<N>``: the Triton attention decode's tiles; ``+sp<N>``: the input projection of a GDN/KDA layer asks L2 for
  its recurrent state when that holds at most ``N`` MiB, ``evaluators.mixers.STATE_L2_PREFETCH_MIB``; ``+sa<N>``:
  each GDN/KDA state program asks L2 for the tile of the program ``N`` x SMs places on,
  ``kernels.fused_decode.STATE_LOOKAHEAD_PER_SM``; ``+wp<N>``: a mixer's input projection asks L2 for the first
  ``N`` MiB of its output projection's weight, ``evaluators.mixers.OUTPUT_WEIGHT_L2_PREFETCH_MIB``; ``+es<N>``: the
  GDN/KDA state kernels load their state tile first from ``N`` rows up, ``kernels.fused_decode.STATE_EARLY_LOAD_MIN_ROWS``;
  :data:`NUMERIC_KNOBS`), ``+oshape`` (the mixers' output
  projections on the q/k/v tiles, unsplit, as in sessions 6-9: ``kernels.projection.RESIDUAL_TILES_BY_SHAPE``),
  ``+urope`` (RoPE and the KV-cache write as a launch of their own after the attention layers' q/k/v projection, as
  before session 14: ``evaluators.mixers.FUSED_ROPE_PROJECTION = False``), ``+wide`` (the GDN/KDA state kernels
  form every state address in 64 bits, as until session 17: ``kernels.fused_decode.STATE_WIDE_ADDRESSES``).

Correctness: before each variant's timed replays the recurrent and conv states are restored to one snapshot and
the step is replayed once; its logits must equal the first variant's bit for bit where the variants run the same
kernels with the same tiles in the same order (only when a kernel starts differs, so any difference is a race).
Variants that change the arithmetic (``+unorm`` rounds the normalised rows once more; ``+tattn`` and ``+grouped``
sum attention in another order) report their relative difference from the first instead.

    python benchmarks/ab_decode_step.py --out $OUT/decode_step_ab_h200.json \\
        --placements all-attention,all-swa,all-gdn,all-kda,mixed --batch 1,16 --variants nopdl,pdl,pdl_pf8

Writes JSON (machine, versions, command, date, one record per placement and batch) and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
from profile_decode_step import add_step_args, copy_bandwidth

from placement_search.evaluators import Supernet, mixers_for
from placement_search.evaluators import mixers as _mixers
from placement_search.evaluators import throughput as T
from placement_search.evaluators.cache import AttentionCache
from placement_search.files import write_json_atomic
from placement_search.kernels import fused_decode as _fused_decode
from placement_search.kernels import projection as _projection
from placement_search.spec import get_spec

_attention = sys.modules["placement_search.kernels.attention"]  # the module (the package's ``attention`` is the op)
#: ``+<knob><N>`` sets a module constant for the variant: value columns per GDN/KDA state program (from 16 rows up);
#: the rows from which the GDN/KDA conv step is a launch of its own; the state kernels' register cap; the output
#: projections' K ranges; the Triton attention decode's slots per block, blocks in flight, warps and programs per SM;
#: the largest GDN/KDA recurrent state (MiB) the input projection asks L2 for; the state kernels' L2 lookahead.
NUMERIC_KNOBS = {
    "bv": (_fused_decode, "BLOCK_V"),
    "pc": (_fused_decode, "PRECONV_MIN_ROWS"),
    "sr": (_fused_decode, "STATE_MAX_REGISTERS"),
    "os": (_projection, "OUTPUT_SPLIT"),
    "tb": (_attention, "TRITON_DECODE_BLOCK_S"),
    "ts": (_attention, "TRITON_DECODE_STAGES"),
    "tw": (_attention, "TRITON_DECODE_WARPS"),
    "tp": (_attention, "TRITON_DECODE_PROGRAMS_PER_SM"),
    "sp": (_mixers, "STATE_L2_PREFETCH_MIB"),
    "spp": (_mixers, "STATE_L2_PREFETCH_PART_MIB"),
    "sa": (_fused_decode, "STATE_LOOKAHEAD_PER_SM"),
    "wp": (_mixers, "OUTPUT_WEIGHT_L2_PREFETCH_MIB"),
    "es": (_fused_decode, "STATE_EARLY_LOAD_MIN_ROWS"),
    "vf": (_fused_decode, "STATE_GRID_MEMORY_ORDER_MIN_ROWS"),
    "sw": (_fused_decode, "STATE_NUM_WARPS"),
    "fw": (_fused_decode, "FINISH_NUM_WARPS"),
}
KNOB_DEFAULTS = {knob: getattr(module, attr) for knob, (module, attr) in NUMERIC_KNOBS.items()}
#: ``+<knob><N>``: one tile setting of one projection role (``kernels.projection.TILE_OVERRIDES``): the mixers' output
#: projections' columns per program, stages, K ranges, warps; the MLP gate/up's, the mixers' input projections', the
#: attention q/k/v projection's with RoPE (``rb``: column pairs) and the MLP down projection's columns, K step,
#: stages, warps.
TILE_KNOBS = {
    "ob": ("mixer_output", "BN"), "og": ("mixer_output", "STAGES"), "ok": ("mixer_output", "SPLIT"),
    "ow": ("mixer_output", "num_warps"),
    "gb": ("gated", "BN"), "gk": ("gated", "BK"), "gs": ("gated", "STAGES"), "gw": ("gated", "num_warps"),
    "ib": ("input", "BN"), "ik": ("input", "BK"), "is": ("input", "STAGES"), "iw": ("input", "num_warps"),
    "rb": ("rope", "BN"), "rk": ("rope", "BK"), "rs": ("rope", "STAGES"), "rw": ("rope", "num_warps"),
    "db": ("mlp_down", "BN"), "dk": ("mlp_down", "BK"), "dg": ("mlp_down", "STAGES"), "dw": ("mlp_down", "num_warps"),
}  # fmt: skip

LABELS = {"all-attention": "attention", "all-swa": "sliding_window", "all-gdn": "gdn", "all-kda": "kda"}


def apply_variant(name: str) -> None:
    """Set the module switches for variant ``name`` (see the module docstring): a PDL setting, then optionally
    ``+tattn`` (attention decode through the Triton split-K kernel instead of SDPA), ``+grouped`` (SDPA with the
    query heads of a KV head as rows: ``sdpa_grouped``), ``+stream`` (streaming cache hints on the GDN/KDA
    state), ``+unorm`` (RMSNorm kernels before the projections instead of the norm folded into the projections around
    it), ``+gates2`` and ``+oshape`` (KDA's gate up-projections as two calls, the output projections on the q/k/v
    tiles), and numbers for :data:`NUMERIC_KNOBS` (``+bv32``: 32 value columns per GDN/KDA state program)."""
    from placement_search.evaluators import mixers as em
    from placement_search.kernels import backend as kb
    from placement_search.kernels import fused_decode as fd
    from placement_search.kernels import projection as kp

    head, *extras = name.split("+")
    numeric = {}  # +<knob><N>: NUMERIC_KNOBS
    for e in extras:
        knob = e.rstrip("0123456789")
        if (knob in NUMERIC_KNOBS or knob in TILE_KNOBS) and e[len(knob) :].isdigit():
            numeric[knob] = int(e[len(knob) :])
    known = ("tattn", "grouped", "stream", "unorm", "gates2", "oshape", "urope", "wide")
    unknown = [e for e in extras if e not in known and e.rstrip("0123456789") not in numeric]
    base, _, pf = head.partition("_pf")
    modes = ("pdl", "pdl_early", "pdl_late")
    if unknown or (head != "nopdl" and (base not in modes or not (pf.isdigit() or pf == ""))):
        raise SystemExit(
            f"unknown variant {name!r}: expected nopdl, pdl, pdl_early or pdl_late (optionally _pf<lines>), "
            "then optionally +tattn or +grouped, +stream, +unorm, +gates2, +oshape, +urope, +wide, "
            + ", ".join(f"+{k}<N>" for k in (*NUMERIC_KNOBS, *TILE_KNOBS))
        )
    kb.PDL, kp.PDL_PREFETCH_LINES = head != "nopdl", int(pf or 0)
    kb.PDL_TRIGGER = {"pdl_early": "enter", "pdl_late": "late"}.get(base, "exit")
    kb.AUTO_CUDA_DECODE_BACKEND = "triton" if "tattn" in extras else "sdpa_grouped" if "grouped" in extras else "sdpa"
    fd.STATE_STREAM_HINTS = "stream" in extras
    fd.STATE_WIDE_ADDRESSES = "wide" in extras
    kp.FUSE_NORM = "unorm" not in extras
    em.PAIRED_GATE_PROJECTIONS = "gates2" not in extras
    em.FUSED_ROPE_PROJECTION = "urope" not in extras
    kp.RESIDUAL_TILES_BY_SHAPE = "oshape" in extras
    for knob, (module, attr) in NUMERIC_KNOBS.items():
        setattr(module, attr, numeric.get(knob, KNOB_DEFAULTS[knob]))
    kp.TILE_OVERRIDES = {}
    for knob, (role, key) in TILE_KNOBS.items():
        if knob in numeric:
            kp.TILE_OVERRIDES.setdefault(role, {})[key] = numeric[knob]


def placement_of(spec, label: str) -> list[str]:
    if label == "mixed":  # A S G K repeated, as the engine-efficiency benchmark's mixed placement
        order = list(spec.mixer_names)
        return [order[i % len(order)] for i in range(spec.num_layers)]
    if label not in LABELS:
        raise SystemExit(f"unknown placement {label!r}: expected one of {[*LABELS, 'mixed']}")
    return [LABELS[label]] * spec.num_layers


def ab_one(spec, label: str, context: int, batch: int, variants: list[str], rounds: int, device) -> dict:
    placement = placement_of(spec, label)
    model = Supernet(spec, mixers_for(spec, [placement]), device=device, dtype=torch.bfloat16, seed=0).eval()
    model.set_placement(placement)
    gen = torch.Generator(device=device).manual_seed(0)
    cache = model.new_cache(batch, context)
    pos0 = T.prepare_cache(cache, context, gen)
    token = torch.randint(0, spec.vocab_size, (batch,), device=device, generator=gen)
    step = T.decode_step_fn(model, cache, token, pos0, context)
    # Attention caches are rewritten with the same keys at the same slot by every replay; the recurrent and conv
    # states move on, so they are put back before the replay whose logits are compared.
    moving = [t for layer in cache.layers if not isinstance(layer, AttentionCache)
              for t in vars(layer).values() if isinstance(t, torch.Tensor)]  # fmt: skip
    snapshot = [t.clone() for t in moving]
    times: dict[str, list[float]] = {v: [] for v in variants}
    equal: dict[str, bool] = {}
    max_diff: dict[str, float] = {}
    reference = None
    with torch.no_grad():
        for _ in range(rounds):
            for name in variants:
                apply_variant(name)
                for _ in range(2):  # compiles this variant's kernels outside the capture
                    step()
                torch.cuda.synchronize(device)
                captured = T.CapturedStep(step, device)
                for t, s in zip(moving, snapshot, strict=True):
                    t.copy_(s)
                captured.replay()
                torch.cuda.synchronize(device)
                logits = captured.out.clone()
                if reference is None:
                    reference = logits
                equal[name] = equal.get(name, True) and bool(torch.equal(logits, reference))
                diff = ((logits.float() - reference.float()).norm() / reference.float().norm()).item()
                max_diff[name] = max(max_diff.get(name, 0.0), diff)
                times[name].append(captured.time(30, budget_s=1.0).ms)
                captured.close()
                T.free_memory(device)
    del cache, model, snapshot
    T.free_memory(device)
    med = {v: round(statistics.median(ts), 4) for v, ts in times.items()}
    base = med[variants[0]]
    return {
        "placement": label, "context": context, "batch": batch, "step_ms": med,
        "rounds_ms": {v: [round(x, 4) for x in ts] for v, ts in times.items()},
        "vs_first": {v: round(m / base - 1, 4) for v, m in med.items()},
        "logits_equal_first": equal, "logits_rel_diff_first": max_diff,
    }  # fmt: skip


def ptx_check(device) -> dict:
    """Compile the skinny projection with PDL and prefetch and report which instructions its PTX holds."""
    from placement_search.kernels import projection as kp

    apply_variant("pdl_pf8")
    x = torch.randn(1, 5120, device=device, dtype=torch.bfloat16)
    w = torch.randn(6144, 5120, device=device, dtype=torch.bfloat16)
    y = kp.linear(x, w, backend="triton")
    err = ((y.float() - (x.float() @ w.float().T)).norm() / (x.float() @ w.float().T).norm()).item()
    try:  # Triton's per-device kernel cache: (compiled kernels by key, ...) in 3.x
        caches = kp._triton_module().skinny_linear_kernel.device_caches.values()
        kernels = [k for cache in caches for k in cache[0].values()]
    except Exception as e:
        return {"relative_error_vs_fp32": err, "ptx": f"unavailable: {type(e).__name__}: {e}"}
    ptx = "\n".join(k.asm.get("ptx", "") for k in kernels)
    return {"relative_error_vs_fp32": err, "griddepcontrol.wait": "griddepcontrol.wait" in ptx,
            "griddepcontrol.launch_dependents": "griddepcontrol.launch_dependents" in ptx,
            "prefetch.global.L2": "prefetch.global.L2" in ptx, "compiled_variants": len(kernels)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, "all-attention,all-swa,all-gdn,all-kda,mixed", "1,16")
    ap.add_argument("--variants", default="nopdl,pdl,pdl_pf8", help="comma list; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        apply_variant(v)  # fails early on an unknown name
    device = torch.device("cuda")
    spec = get_spec("super-apriel-15b")
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "device": torch.cuda.get_device_name(device), "python": platform.python_version(),
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "copy_bandwidth_gbs": round(copy_bandwidth(device) / 1e9, 1), "variants": variants,
              "ptx": ptx_check(device), "rows": []}  # fmt: skip
    print(f"copy bandwidth {record['copy_bandwidth_gbs']} GB/s; ptx {record['ptx']}", flush=True)
    print(f"{'placement':14} {'B':>4} " + " ".join(f"{v:>10}" for v in variants) + "  equal", flush=True)
    for label, batch in [(p, int(b)) for p in args.placements.split(",") for b in args.batch.split(",")]:
        try:
            row = ab_one(spec, label, args.context, batch, variants, args.rounds, device)
        except Exception as e:  # one failing row does not lose the others
            row = {"placement": label, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            T.free_memory(device)
        record["rows"].append(row)
        write_json_atomic(Path(args.out), record)
        if "error" in row:
            print(label, batch, row["error"], flush=True)
            continue
        cells = " ".join(f"{row['step_ms'][v]:>10.4f}" for v in variants)
        print(f"{label:14} {batch:>4} {cells}  {all(row['logits_equal_first'].values())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
