#!/usr/bin/env python3
"""GPU measurement campaign: decode cost tables, whole-model validation, engine efficiency, memory check.

One process, sections in priority order, each guarded by a deadline, the raw JSON rewritten after each:

1. ``ceilings``  — copy bandwidth (read + write) and bf16 matmul rate, measured in this run.
2. ``pieces``    — the cost-table grid: per-block decode time of each mixer over contexts x batches, the
                   mixer-less block and the head (see ``evaluators/cost_model.py`` for why pieces).
2b. ``step_context`` — the attention mixers' step-wide work (RoPE tables, write slots, validity mask: built once
                   per step, held ``1/k`` by a ``k``-block piece) at a few batches of each piece grid.
3. ``thin``      — thin random models of all-attention, all-SWA, all-GDN, all-KDA and a mixed placement:
                   largest batch where allocation (cache + captured graph + replay) actually fails vs the
                   memory model, and whole-model decode at batch 1, 16 and that largest batch (engine efficiency).
4. ``validation``— the full supernet resident: random placements (uniform, skewed counts, single layer of a
                   mixer) at 16K and 32K under ``fixed:16`` and ``max_fit`` (115 GiB), one CUDA graph per step.
5. ``kernels``   — the decode kernels alone at 15B sizes (GDN/KDA recurrent steps, attention decode) against
                   their memory roofline, plus an in-place GDN step variant checked against the runtime's.
6. ``prefill``   — prefill throughput of the engine placements (batch 1) at 16K (and 32K without SWA).

Then the cost table is built from the raw data (``evaluators.cost_model.build_table``) and the engine
efficiency and cost-model accuracy summaries are printed (``engine_efficiency.py`` / ``cost_model_accuracy.py``
redo those from the raw JSON on any machine).

Usage (GPU): python benchmarks/measure_decode.py --out results [--deadline-s 480]
Smoke test (CPU, tiny model, no CUDA graphs): python benchmarks/measure_decode.py --device cpu --tiny --out /tmp/x
Rebuild the table from raw data (CPU): python benchmarks/measure_decode.py --build-from results/decode_measurements_h200.json
Several runs: ``--build-from RUN,RUN:KEY+KEY,...`` (the pieces of the last run that has them; a ``:KEY+KEY`` suffix
keeps only those rows of a run: ``prefill``, ``memory_check``, ``kernels``, ``step_context``, ``whole@engine``,
``whole@validation``,
optionally ``/LABEL/LABEL`` or ``/LABEL=BATCH``); the shipped table's command is in README.md ("Decode speed on the
H200").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_common import RAW_NAME, measure_kernels, tiny_spec  # noqa: E402

from placement_search.evaluators.cost_model import (  # noqa: E402
    DEFAULT_CONTEXTS,
    batch_grid,
    build_table,
    context_independent,
    dense_batch_grid,
)
from placement_search.evaluators.memory import (  # noqa: E402
    GiB,
    RuntimeOverheads,
    batch_upper_bound,
    max_batch,
    memory_breakdown,
    mixer_cache_bytes,
)
from placement_search.files import write_json_atomic  # noqa: E402
from placement_search.placement import Placement  # noqa: E402
from placement_search.spec import AttentionSpec, ModelSpec, get_spec  # noqa: E402

#: Runtime overheads used for the shipped tables (see evaluators/memory.py; sized from the allocator).
OVERHEADS = RuntimeOverheads()
VALIDATION_CONTEXTS = (16384, 32768)
VALIDATION_FIXED_BATCH = 16
VALIDATION_BUDGET_GIB = 115.0
ENGINE_CONTEXT = 32768
COVERAGE_BUDGET_GIB = 144.0
PIECE_BLOCKS = 4
#: Mixers whose measured per-block cost alternates between two levels from one batch to the next, from the
#: batch where that starts: the table keeps their least-squares line there. GDN on the H200 (fla 0.6, the
#: runtime's fresh-state + copy_ step): mixer cost per sequence rises from 3.65 us at B=240 to 4.11 us at
#: B=256, then alternates between ~3.3 and ~3.9 us (384: 3.41, 512: 3.90, 960: 3.25, 1024: 3.84) with the
#: buffers' relative placement, so a point-wise table would be off by up to ~9% either way.
#: With the fused Triton step (session 5, run 4) the cost falls smoothly instead (1.60 us at 256 to 1.36 us at
#: 1217, mixer only); the line from 256 is kept: without it the accuracy benchmark moves by < 0.1 point.
SMOOTH_FROM = {"gdn": 256}
MERGED_NAME = "decode_measurements_h200_merged.json"
TABLE_NAME = "cost_tables/super-apriel-15b_h200.json"


# --------------------------------------------------------------------------------------------
# Models and placements


def engine_placements(spec: ModelSpec) -> dict[str, list[str]]:
    """All-X for every mixer, plus ``A S G K`` repeated (every mixer, evenly interleaved)."""
    n = spec.num_layers
    names = list(spec.mixer_names)
    out = {f"all-{m}": [m] * n for m in names}
    out["mixed"] = [names[i % len(names)] for i in range(n)]
    return out


def random_placements(spec: ModelSpec, count: int, seed: int, max_main: int | None = None) -> list[dict[str, Any]]:
    """Uniform, skewed-count and single-layer-of-a-mixer placements (a third each), reproducible."""
    rng = random.Random(seed)
    names = list(spec.mixer_names)
    n = spec.num_layers
    max_main = n if max_main is None else max_main
    out: list[dict[str, Any]] = []
    kinds = ["uniform", "skewed", "single"]
    i = 0
    while len(out) < count:
        kind = kinds[i % 3]
        i += 1
        if kind == "uniform":
            mixers = [rng.choice(names) for _ in range(n)]
        elif kind == "skewed":
            dominant = rng.choice(names)
            k = rng.randint(int(0.6 * n), int(0.85 * n))
            others = [m for m in names if m != dominant]
            mixers = [dominant] * k + [rng.choice(others) for _ in range(n - k)]
            rng.shuffle(mixers)
        else:
            base, one = rng.sample(names, 2)
            mixers = [base] * n
            mixers[rng.randrange(n)] = one
        if mixers.count(names[0]) > max_main:
            continue
        out.append({"kind": kind, "mixers": mixers})
    return out


# --------------------------------------------------------------------------------------------
# The campaign


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from placement_search.evaluators import throughput as T

        self.torch = torch
        self.T = T
        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.spec = tiny_spec() if self.tiny else get_spec("super-apriel-15b")
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw_path = self.out / args.raw_name
        meta = T.device_info(self.device)
        meta["model"] = self.spec.name
        meta["config_hash"] = self.spec.config_hash
        meta["overheads"] = OVERHEADS.to_dict()
        if args.attention_decode:
            from placement_search.kernels import backend as kb

            kb.AUTO_CUDA_DECODE_BACKEND = args.attention_decode
        meta["attention_decode"] = args.attention_decode or "auto (sdpa)"
        self.raw: dict[str, Any] = {
            "meta": meta,
            "ceilings": {},
            "kernels": [],
            "pieces": [],
            "step_context": [],
            "whole": [],
            "memory_check": [],
            "prefill": [],
            "skipped": [],
            "errors": [],
        }
        if self.tiny:
            self.contexts = (8, 16, 32)
            self.validation_contexts = (16, 32)
            self.engine_context = 32
            self.max_batch = 6
            self.total_bytes = 8 * GiB
        else:
            self.contexts = tuple(DEFAULT_CONTEXTS)
            self.validation_contexts = VALIDATION_CONTEXTS
            self.engine_context = ENGINE_CONTEXT
            self.max_batch = None
            self.total_bytes = meta.get("device_memory_bytes") or int(COVERAGE_BUDGET_GIB * GiB)
        self.raw["meta"]["contexts"] = list(self.contexts)

    # -- bookkeeping ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def time_left(self) -> float:
        return self.args.deadline_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.raw["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        write_json_atomic(self.raw_path, self.raw)

    def guard(self, what: str, reserve_s: float = 0.0) -> bool:
        if self.time_left() > reserve_s:
            return True
        self.raw["skipped"].append(what)
        return False

    def section(self, name: str, fn: Any) -> None:
        if name not in self.args.sections:
            return
        if not self.guard(f"section {name}"):
            self.log(f"skip {name}: deadline")
            return
        self.log(f"== {name}")
        try:
            fn()
        except Exception as e:
            self.raw["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc()[-3000:]})
            self.log(f"!! {name} failed: {type(e).__name__}: {e}")
        finally:
            self.T.free_memory(self.device)
            self.save()

    def point_error(self, what: str, e: BaseException) -> None:
        """Record a failed measurement point and carry on with the next."""
        self.raw["errors"].append({"point": what, "error": f"{type(e).__name__}: {str(e)[:400]}",
                                   "traceback": traceback.format_exc()[-2000:]})
        self.log(f"!! {what}: {type(e).__name__}: {str(e)[:200]}")
        self.T.free_memory(self.device)

    def cap(self, b: int) -> int:
        return b if self.max_batch is None else min(b, self.max_batch)

    # -- 1. ceilings ----------------------------------------------------------------------------

    def ceilings(self) -> None:
        nbytes = (64 << 20) if self.tiny else 4 * GiB
        c = {"copy_gbps": self.T.copy_bandwidth_gbps(self.device, nbytes),
             "matmul_tflops": self.T.matmul_tflops(self.device, 512 if self.tiny else 8192)}
        self.raw["ceilings"] = c
        self.log(f"copy {c['copy_gbps']:.0f} GB/s (read+write), matmul {c['matmul_tflops']:.0f} TFLOP/s")

    # -- 2. kernels alone -----------------------------------------------------------------------

    def kernels(self) -> None:
        if self.device.type != "cuda":
            self.raw["skipped"].append("kernels: needs CUDA and fla")
            return
        self.raw["kernels"] = measure_kernels(self.spec, self.device, (16, 256, 1024), self.log)

    # -- 3. pieces ------------------------------------------------------------------------------

    def reference_context(self) -> int:
        """Where a context-independent mixer's pieces are measured densely (its one curve)."""
        return self.contexts[len(self.contexts) // 2] if not self.tiny else self.contexts[-1]

    def piece_grid(self, mixer: str, context: int) -> list[int]:
        """The batch grid of ``mixer``'s pieces at ``context``: up to the largest batch of any placement using it."""
        coverage = COVERAGE_BUDGET_GIB * GiB if not self.tiny else self.total_bytes
        top = self.cap(batch_upper_bound(self.spec, mixer, context, coverage, overheads=OVERHEADS))
        return dense_batch_grid(top) if self.args.grid == "dense" else batch_grid(top)

    def pieces(self) -> None:
        torch, T = self.torch, self.T
        spec = self.spec
        model = T.piece_model(spec, PIECE_BLOCKS, self.device)
        bench = T.PieceBench(model, replays=self.args.replays)
        all_batches: set[int] = set()
        ref = self.reference_context()
        plan: list[tuple[str, int, list[int]]] = []
        for m in spec.mixer_names:
            indep = context_independent(spec, m, self.contexts)
            for c in self.contexts:
                grid = self.piece_grid(m, c)
                if indep and c != ref:
                    if c not in (self.contexts[0], self.contexts[-1]):
                        continue
                    grid = sorted({grid[0], grid[len(grid) // 2], grid[-1]})  # spot check of independence
                plan.append((m, c, grid))
                all_batches.update(grid)
        self.raw["meta"]["piece_plan"] = [{"mixer": m, "context": c, "batches": g} for m, c, g in plan]
        for m, c, grid in plan:
            if not self.guard(f"pieces {m}@{c}", 60):
                break
            per_row = mixer_cache_bytes(spec.mixer(0, m), c, dtype="bfloat16" if not self.tiny else "float32")
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                rows_cap = int((free - 4 * GiB) // per_row)
            else:
                rows_cap = PIECE_BLOCKS * max(grid)
            usable = [b for b in grid if b <= rows_cap]
            if len(usable) < len(grid):
                self.raw["skipped"].append(f"pieces {m}@{c}: batches {grid[len(usable):]} exceed free memory")
            if not usable:
                continue
            rows = max(min(PIECE_BLOCKS, rows_cap // b) * b for b in usable)
            big = pos = None
            try:
                big, pos = bench.allocate(m, c, rows)
                for b in usable:
                    k = min(PIECE_BLOCKS, rows // b)
                    t = bench.layer(m, big, pos, b, k)
                    self.raw["pieces"].append({"kind": "layer", "mixer": m, "context": c, "batch": b, "k": k,
                                               "ms": t.ms, "p10": t.p10, "p90": t.p90, "n": len(t.times_ms)})
            except Exception as e:
                self.point_error(f"pieces {m}@{c}", e)
            finally:
                del big, pos
                T.free_memory(self.device)
            last = self.raw["pieces"][-1]
            self.log(f"layer {m:>14} L={c:>6}: {len(usable)} batches up to {usable[-1]} "
                     f"({last['ms']:.3f} ms/layer at the top)")
            self.save()
        for b in sorted(all_batches):
            if not self.guard("pieces shared/head", 30):
                break
            try:
                t = bench.shared(b)
                self.raw["pieces"].append({"kind": "shared", "mixer": None, "context": None, "batch": b,
                                           "k": PIECE_BLOCKS, "ms": t.ms, "p10": t.p10, "p90": t.p90})
                h = bench.head(b)
                self.raw["pieces"].append({"kind": "head", "mixer": None, "context": None, "batch": b, "k": 1,
                                           "ms": h.ms, "p10": h.p10, "p90": h.p90})
            except Exception as e:
                self.point_error(f"pieces shared/head B={b}", e)
        self.log(f"shared/head: {len(all_batches)} batches")
        del bench, model

    # -- 3b. step-wide work of the attention mixers --------------------------------------------

    def step_context(self) -> None:
        spec = self.spec
        model = self.T.piece_model(spec, 1, self.device)
        bench = self.T.PieceBench(model, replays=self.args.replays)
        for m in spec.mixer_names:
            if not isinstance(spec.mixer(0, m), AttentionSpec):
                continue
            indep = context_independent(spec, m, self.contexts)
            for c in self.contexts if not indep else (self.reference_context(),):
                if not self.guard(f"step_context {m}@{c}", 10):
                    return
                grid = self.piece_grid(m, c)  # the pieces' grid: both ends, four batches between, and 16
                spread = {grid[round(i * (len(grid) - 1) / 5)] for i in range(6)}
                batches = sorted(spread | ({16} if grid[-1] >= 16 else set()))
                for b in batches:
                    try:
                        t = bench.step_context(m, c, b)
                        self.raw["step_context"].append({"mixer": m, "context": c, "batch": b, "ms": t.ms,
                                                         "p10": t.p10, "p90": t.p90, "n": len(t.times_ms)})
                    except Exception as e:
                        self.point_error(f"step_context {m}@{c} B={b}", e)
                self.log(f"step context {m:>14} L={c:>6}: batches {batches}, "
                         f"{self.raw['step_context'][-1]['ms'] * 1e3:.1f} us at the top")
        self.save()
        del bench, model

    # -- 4. thin models: memory check + engine efficiency ---------------------------------------

    def thin(self) -> None:
        torch, T = self.torch, self.T
        spec = self.spec
        from placement_search.evaluators import Supernet, mixers_for

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        c = self.args.engine_context or self.engine_context
        fixed = self.args.engine_batches  # given: those batches only, without the memory check's largest batch
        for label, mixers in engine_placements(spec).items():
            if self.args.thin_labels and label not in self.args.thin_labels:
                continue
            if not self.guard(f"thin {label}", 45):
                break
            T.free_memory(self.device)
            model = None
            try:
                model = Supernet(spec, mixers_for(spec, [mixers]), device=self.device, dtype=dtype, seed=0).eval()
                code = Placement(mixers, spec.search_space).code()
                if fixed:
                    actual, batches = None, sorted(fixed)
                else:
                    actual = self.memory_check(model, label, code, mixers, c)
                    batches = sorted({1, 16, actual} if actual >= 16 else {1, actual})
                for b in batches:
                    if b < 1 or not self.guard(f"engine {label} B={b}", 20):
                        continue
                    # The largest batch that allocates leaves no room for the step's workspace and CUDA graph
                    # pool when the caches fill the GPU to the byte: step down 2% at a time (at most 3 times)
                    # and record the batch that ran.
                    tried, largest = [], b == actual
                    for attempt in range(4):
                        try:
                            mm = T.measure_decode(model, mixers, c, self.cap(b), replays=self.args.replays)
                            break
                        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                            # an allocation outside torch's caching allocator (a kernel's or library's workspace)
                            # fails as a plain CUDA error ("out of memory"; run 9's all-KDA at 1108)
                            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
                            if not oom or not largest or attempt == 3:
                                raise
                        # out of the except block: the traceback (and the failed attempt's cache) is released
                        tried.append(b)
                        T.free_memory(self.device)
                        b = max(1, int(b * 0.98))
                    mem = memory_breakdown(spec, mixers, c, mm.batch, overheads=OVERHEADS)
                    self.raw["whole"].append({**mm.to_dict(), "tag": "engine", "label": label, "policy": None,
                                              "out_of_memory_at": tried,
                                              "memory_budget_gib": None, "resident": "placement",
                                              "copy_gbps": self.raw["ceilings"].get("copy_gbps"),
                                              "predicted_cache_bytes": mem.cache,
                                              "predicted_workspace_bytes": mem.workspace})
                    self.log(f"engine {label:>20} B={mm.batch:>5}: {mm.step_ms:8.3f} ms, {mm.tokens_per_s:10.1f} tok/s")
                    self.save()
            except Exception as e:
                self.point_error(f"thin {label}", e)
            finally:
                del model
                T.free_memory(self.device)

    def memory_check(self, model, label: str, code: str, mixers: list[str], c: int) -> int:  # type: ignore[no-untyped-def]
        """The largest batch of ``model`` at context ``c`` that allocates, against the memory model's prediction
        (a ``memory_check`` row)."""
        torch, T, spec = self.torch, self.T, self.spec
        reserve = T.runtime_reserve_bytes(self.device)
        predicted = max_batch(spec, mixers, c, self.total_bytes, overheads=OVERHEADS)
        row: dict[str, Any] = {"label": label, "placement": code, "context": c,
                               "budget_bytes": self.total_bytes, "predicted": predicted,
                               "reserve_measured_bytes": reserve,
                               "weights_allocated_bytes": torch.cuda.memory_allocated(self.device)
                               if self.device.type == "cuda" else None}  # fmt: skip
        if self.device.type == "cuda":
            actual, probes = T.largest_batch(model, mixers, c, predicted)
        else:
            actual, probes = self.cap(predicted), []
        row.update(actual=actual, probes=probes)
        self.raw["memory_check"].append(row)
        err = (predicted - actual) / max(actual, 1) * 100
        self.log(f"memory {label:>20}: predicted {predicted}, allocation fails above {actual} ({err:+.1f}%)")
        return actual

    # -- 5. validation on the resident supernet -------------------------------------------------

    def validation(self) -> None:
        torch, T = self.torch, self.T
        spec = self.spec
        from placement_search.evaluators import Supernet
        from placement_search.presets import BatchPolicy

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = Supernet(spec, device=self.device, dtype=dtype, seed=0).eval()
        self.supernet = model
        budget_gib = VALIDATION_BUDGET_GIB if not self.tiny else self.total_bytes / GiB / 2
        fixed = VALIDATION_FIXED_BATCH if not self.tiny else 4
        main = spec.mixer_names[0]
        placements = random_placements(spec, self.args.placements, seed=self.args.seed,
                                       max_main=int(0.85 * spec.num_layers))
        self.raw["meta"]["validation"] = {"budget_gib": budget_gib, "fixed_batch": fixed,
                                          "contexts": list(self.validation_contexts),
                                          "placements": [Placement(p["mixers"], spec.search_space).code()
                                                         for p in placements],
                                          "main_mixer": main}
        for idx, p in enumerate(placements):
            mixers = p["mixers"]
            for c in self.validation_contexts:
                for policy in (BatchPolicy("fixed", batch=fixed), BatchPolicy("max_fit")):
                    if not self.guard("validation", 15):
                        return
                    if policy.kind == "fixed":
                        b = fixed
                    else:
                        b = self.cap(max_batch(spec, mixers, c, budget_gib * GiB, overheads=OVERHEADS))
                    resident = memory_breakdown(spec, mixers, c, b, resident="supernet", overheads=OVERHEADS)
                    if resident.total > self.total_bytes:
                        self.raw["skipped"].append(f"validation {idx} {c} {policy}: {b} does not fit beside the supernet")
                        continue
                    try:
                        mm = T.measure_decode(model, mixers, c, b, replays=self.args.replays, budget_s=0.3)
                    except Exception as e:
                        self.point_error(f"validation {idx} L={c} {policy} B={b}", e)
                        continue
                    self.raw["whole"].append({**mm.to_dict(), "tag": "validation", "kind": p["kind"],
                                              "policy": str(policy), "memory_budget_gib": budget_gib,
                                              "resident": "supernet"})
            self.log(f"validation {idx + 1}/{len(placements)} {p['kind']:>7} "
                     f"{Placement(mixers, spec.search_space).code()}")
            self.save()

    # -- 6. prefill -----------------------------------------------------------------------------

    def prefill(self) -> None:
        T = self.T
        model = getattr(self, "supernet", None)
        if model is None:
            import torch

            from placement_search.evaluators import Supernet

            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            model = Supernet(self.spec, device=self.device, dtype=dtype, seed=0).eval()
        contexts = (16, 32) if self.tiny else (16384, 32768)
        for label, mixers in engine_placements(self.spec).items():
            if self.args.prefill_labels and label not in self.args.prefill_labels:
                continue
            for c in contexts:
                swa = "sliding_window" in mixers
                if c != contexts[0] and swa and not self.tiny:
                    continue  # FlexAttention compiles once per shape: one SWA context is enough here
                if not self.guard(f"prefill {label}@{c}", 90 if swa else 40 if {"gdn", "kda"} & set(mixers) else 20):
                    continue
                try:
                    r = T.measure_prefill(model, mixers, c, 1)
                except Exception as e:
                    self.point_error(f"prefill {label}@{c}", e)
                    continue
                r["label"] = label
                self.raw["prefill"].append(r)
                self.log(f"prefill {label:>20} L={c:>6}: {r['ms']:9.2f} ms, {r['tokens_per_s']:10.0f} tok/s")
                self.save()

    def run(self) -> None:
        self.log(f"{self.raw['meta'].get('gpu')} torch {self.raw['meta']['torch']} model {self.spec.name}")
        self.section("ceilings", self.ceilings)
        self.section("pieces", self.pieces)
        self.section("step_context", self.step_context)
        self.section("thin", self.thin)
        self.section("validation", self.validation)
        # last but one: it calls an fla Triton kernel directly (a bad launch would end the process)
        self.section("kernels", self.kernels)
        self.section("prefill", self.prefill)
        self.supernet = None
        self.save()
        self.log(f"raw measurements -> {self.raw_path}")


# --------------------------------------------------------------------------------------------


def select_sections(raw: dict[str, Any], keys: str | None) -> dict[str, Any]:
    """``raw`` with only the rows ``keys`` names (``+``-separated ``SECTION``, ``whole@TAG`` or either followed by
    ``/LABEL/LABEL``, a label optionally ``LABEL=BATCH`` for that batch's row only); meta and ceilings always kept;
    None keeps everything."""
    if keys is None:
        return raw
    out = {k: (v if k in ("meta", "ceilings") else [] if isinstance(v, list) else v) for k, v in raw.items()}
    for key in keys.split("+"):
        name, *labels = key.split("/")
        section, _, tag = name.partition("@")
        wanted = [lab.partition("=") for lab in labels]
        for row in raw.get(section) or []:
            if tag and row.get("tag") != tag:
                continue
            if not labels or any(row.get("label") == lab and (not b or str(row.get("batch")) == b)
                                 for lab, _, b in wanted):  # fmt: skip
                out[section].append(row)
    return out


def merge_raw(raws: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """Several campaign runs as one: the pieces of the LAST run that has pieces (a table never mixes runs);
    whole-model rows, memory checks, prefill and kernel rows of every run (each keeps its run's copy
    bandwidth); the first run's meta plus the list of runs."""
    merged: dict[str, Any] = {"meta": dict(raws[0]["meta"]), "pieces": [], "step_context": [], "whole": [],
                              "memory_check": [], "prefill": [], "kernels": [], "skipped": [], "errors": []}
    merged["meta"]["runs"] = []
    for src, raw in zip(sources, raws, strict=True):
        meta = dict(raw["meta"])
        meta.pop("piece_plan", None)
        copy_gbps = (raw.get("ceilings") or {}).get("copy_gbps")
        merged["meta"]["runs"].append({"source": src, "ceilings": raw.get("ceilings"), **{
            k: meta.get(k) for k in ("date", "command", "host", "gpu", "torch", "cuda", "triton", "fla", "python")}})
        if raw.get("pieces"):
            merged["pieces"] = raw["pieces"]
            merged["meta"]["pieces_from"] = src
            for k in ("date", "command", "host", "gpu", "torch", "cuda", "triton", "fla", "python",
                      "device_memory_gib", "device_memory_bytes", "contexts"):
                if k in meta:
                    merged["meta"][k] = meta[k]
            merged["ceilings"] = raw.get("ceilings")
        for key in ("whole", "memory_check", "prefill", "kernels", "step_context"):
            for row in raw.get(key) or []:
                row = dict(row)
                row.setdefault("run", src)
                if key in ("whole", "kernels") and copy_gbps is not None:
                    row.setdefault("copy_gbps", copy_gbps)
                merged[key].append(row)
        merged["skipped"] += raw.get("skipped") or []
        merged["errors"] += raw.get("errors") or []
    merged.setdefault("ceilings", raws[-1].get("ceilings"))
    return merged


def build_outputs(raw_path: Path, out: Path, spec: ModelSpec, table_name: str) -> Path:
    """Build the cost table from raw data and run the two analyses; returns the table path."""
    import cost_model_accuracy
    import engine_efficiency

    raw = json.loads(raw_path.read_text())
    contexts = raw["meta"].get("contexts") or list(DEFAULT_CONTEXTS)
    smooth = SMOOTH_FROM if spec.name == "super-apriel-15b" else None
    table = build_table(raw, spec, contexts=contexts, overheads=OVERHEADS, smooth_from=smooth, source=str(raw_path))
    table_path = out / table_name
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table = type(table)(**{**table.__dict__, "source": str(table_path)})
    table.save(table_path)
    print(f"cost table -> {table_path}")
    engine_efficiency.main(["--raw", str(raw_path), "--out", str(out), "--tiny" if spec.name == "tiny-apriel" else "--no-tiny"])
    cost_model_accuracy.main(["--raw", str(raw_path), "--table", str(table_path), "--out", str(out),
                              "--tiny" if spec.name == "tiny-apriel" else "--no-tiny"])
    return table_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--raw-name", default=RAW_NAME)
    ap.add_argument("--table-name", default=TABLE_NAME)
    ap.add_argument("--sections", default="ceilings,kernels,pieces,step_context,thin,validation,prefill")
    ap.add_argument("--deadline-s", type=float, default=480.0)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--placements", type=int, default=24)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--grid", choices=("dense", "sparse"), default="dense", help="batch grid of the pieces")
    ap.add_argument("--attention-decode", choices=("sdpa", "sdpa_grouped", "triton"), default=None,
                    help="decode attention kernel of every model built here (default: the runtime's auto, sdpa)")
    ap.add_argument("--thin-labels", default="", help="comma list of engine placements for 'thin' (default all)")
    ap.add_argument("--engine-context", type=int, default=None,
                    help=f"context of the 'thin' section's engine steps (default {ENGINE_CONTEXT})")
    ap.add_argument("--engine-batches", default="",
                    help="comma list: 'thin' measures only these batches, without the memory check (default: the "
                         "memory check, then batch 1, 16 and the largest that fits)")  # fmt: skip
    ap.add_argument("--prefill-labels", default="", help="comma list of engine placements for 'prefill'")
    ap.add_argument("--build-from", default=None,
                    help="only build the table + analyses from these raw JSON files (comma list; merged)")
    ap.add_argument("--no-build", action="store_true", help="measure only")
    args = ap.parse_args(argv)
    args.sections = set(args.sections.split(","))
    args.thin_labels = set(filter(None, args.thin_labels.split(",")))
    args.engine_batches = [int(b) for b in args.engine_batches.split(",") if b]
    args.prefill_labels = set(filter(None, args.prefill_labels.split(",")))
    out = Path(args.out)
    if args.build_from:
        # PATH or PATH:KEY+KEY: only those sections of that run (e.g. the prefill rows of an earlier run whose
        # decode path has since changed); a KEY ``whole@TAG`` keeps the whole-model rows of one tag
        # (``engine`` or ``validation``), ``memory_check`` / ``whole@engine`` can also name labels after a
        # ``/`` (``whole@engine/all-gdn/all-kda``) to take only those placements' rows from that run.
        specs = [item.split(":", 1) for item in args.build_from.split(",")]
        paths = [Path(sp[0]) for sp in specs]
        raw_path = paths[0]
        if len(paths) > 1:
            raws = [select_sections(json.loads(p.read_text()), sp[1] if len(sp) == 2 else None)
                    for sp, p in zip(specs, paths, strict=True)]  # fmt: skip
            raw = merge_raw(raws, [":".join(sp) for sp in specs])
            raw_path = out / MERGED_NAME
            write_json_atomic(raw_path, raw)
            print(f"merged {len(paths)} runs -> {raw_path}")
        else:
            raw = json.loads(raw_path.read_text())
        spec = tiny_spec() if raw["meta"].get("model") == "tiny-apriel" else get_spec(raw["meta"]["model"])
        build_outputs(raw_path, out, spec, args.table_name)
        return 0
    campaign = Campaign(args)
    campaign.run()
    if not args.no_build:
        try:
            build_outputs(campaign.raw_path, out, campaign.spec, args.table_name)
        except Exception as e:
            print(f"building outputs failed: {type(e).__name__}: {e}")
            traceback.print_exc()
    return 1 if campaign.raw["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
