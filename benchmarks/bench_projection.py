#!/usr/bin/env python3
"""Decode-step projections: the skinny Triton kernel (:mod:`placement_search.kernels.projection`) against cuBLAS.

A decode step of Super Apriel 15B at batch B multiplies ``[B, K]`` activations by every weight of the placement
once; at small B that is a weight read, so each projection is timed as bytes moved (weight + activation +
output) over time, against the eager device-to-device copy bandwidth measured in the same run. Shapes are the
15B projections, each with the epilogue the runtime fuses into it:

- ``plain``: ``x W^T`` (attention q/k/v, GDN in_proj_qkvz, KDA q/k/v, the LM head, the small gate projections);
- ``residual``: ``r + x W^T`` (the mixers' output projection and the MLP's down projection);
- ``gated``: ``silu(x Wg^T) * (x Wu^T)`` (the MLP's gate and up projections, two weights);

and RMSNorm of ``[B, 5120]`` (one Triton launch against torch's four).

Every variant runs inside a CUDA graph that steps through enough independent weight copies to exceed the 50 MB
L2 several times; the time is the median replay over the number of copies. The ``torch`` row is what the runtime
did before (``F.linear`` and the torch epilogue ops); ``triton`` rows sweep the tile sizes (``BN`` output
columns per program, ``BK`` per pipeline stage, ``STAGES`` stages, warps) times the split-K factor (``SPLIT`` K
ranges per column block, reduced in the same launch by the last program to arrive; ``--splits``, where ``0`` is
:func:`~placement_search.kernels.projection.split_for`'s choice for the GPU's SM count, recorded as the value it
picked); ``best`` is the fastest Triton configuration (its ``config`` holds ``SPLIT``). Splits that the rounding of
the K ranges to whole ``BK`` steps would leave empty are skipped (a smaller split does the same work). Every Triton
result is compared with the torch result on the same inputs (max |diff| over max |ref|; bf16 rounding of the output
bounds it by ~2^-8).

Usage:
    python benchmarks/bench_projection.py --out results            # H200: table + results/projection_kernels_<gpu>.json
    python benchmarks/bench_projection.py --shapes o_proj,down --configs 64x256x5x8,32x256x5x4 --splits 1,2,4,6
    python benchmarks/bench_projection.py --device cpu --tiny       # smoke test in Triton's interpreter (CPU)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# name: (N, K, epilogue); 15B sizes (hidden 5120, MLP 14336, attention 32 x 128 / 8 KV heads, vocab 131072)
SHAPES: dict[str, tuple[int, int, str]] = {
    "q_proj (attention, KDA q/k/v)": (4096, 5120, "plain"),
    "k_proj / v_proj (attention)": (1024, 5120, "plain"),
    "in_proj_qkvz (GDN)": (10240, 5120, "plain"),
    "f_a / g_a (KDA)": (128, 5120, "plain"),
    "o_proj + residual": (5120, 4096, "residual"),
    "gate + up, SiLU (MLP)": (14336, 5120, "gated"),
    "down + residual (MLP)": (5120, 14336, "residual"),
    "lm_head": (131072, 5120, "plain"),
}
TINY_SHAPES: dict[str, tuple[int, int, str]] = {
    "plain": (96, 256, "plain"),
    "residual": (64, 384, "residual"),
    "gated": (64, 256, "gated"),
}
L2_ROTATE_BYTES = 256 * 2**20
SMEM_BYTES = 200 * 1024


def parse_configs(spec: str) -> list[dict[str, int]]:
    """``"32x256x4x4,64x256x5x8"`` (``BN x BK x STAGES x warps``, comma-separated) as config dicts."""
    out = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--configs: {item!r} is not BNxBKxSTAGESxWARPS (e.g. 64x256x5x8)")
        bn, bk, stages, warps = (int(p) for p in parts)
        out.append({"BN": bn, "BK": bk, "STAGES": stages, "num_warps": warps})
    return out


def sweep_configs(tiny: bool, configs: str | None = None) -> list[dict[str, int]]:
    """The tile grid (without ``SPLIT``): ``configs`` (``--configs``) when given, else the default grid."""
    if configs:
        return parse_configs(configs)
    if tiny:
        return [{"BN": 32, "BK": 128, "STAGES": 2, "num_warps": 4}]
    out = []
    for bn in (16, 32, 64):
        for bk in (128, 256, 512):
            for stages in (3, 5):
                for warps in (4, 8) if bn * bk >= 16384 else (4,):
                    out.append({"BN": bn, "BK": bk, "STAGES": stages, "num_warps": warps})
    return out


def with_splits(configs: list[dict[str, int]], splits: list[int], n: int, k: int, sms: int) -> list[dict[str, int]]:
    """Each config times each split (``0``: :func:`split_for`'s pick), skipping splits with an empty K range and
    repeats (an automatic pick equal to an explicit one)."""
    from placement_search.kernels.projection import split_for

    out: list[dict[str, int]] = []
    for cfg in configs:
        for split in splits:
            s = split or split_for(n, k, cfg["BN"], sms, bk=cfg["BK"])
            per = -(-k // s)
            chunk = -(-per // cfg["BK"]) * cfg["BK"]  # as the kernel splits K
            c = {**cfg, "SPLIT": s}
            if (s == 1 or (s - 1) * chunk < k) and c not in out:
                out.append(c)
    return out


def smem_fits(cfg: dict[str, int], gated: bool) -> bool:
    per_stage = (16 + cfg["BN"] * (2 if gated else 1)) * cfg["BK"] * 2
    return per_stage * cfg["STAGES"] <= SMEM_BYTES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results", help="folder for projection_kernels_<gpu>.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes, one config (the CPU smoke test)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--shapes", default=None, help="comma-separated subset of the shape names' first words")
    ap.add_argument("--splits", default="1,2,3,4,6,8", help="split-K factors to sweep (0: split_for's pick)")
    ap.add_argument("--configs", default=None,
                    help="tile configs to sweep instead of the default grid: BNxBKxSTAGESxWARPS,... (e.g. 64x256x5x8)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from bench_decode_kernels import copy_bandwidth, time_graph, versions

    from placement_search.files import write_json_atomic
    from placement_search.kernels import projection as L
    from placement_search.kernels.backend import sm_count
    from placement_search.kernels.norm import rms_norm

    device = torch.device(args.device)
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        keep = set(args.shapes.split(","))
        shapes = {k: v for k, v in shapes.items() if k.split()[0] in keep}
    batches = [int(b) for b in args.batches.split(",")]
    splits = [int(x) for x in args.splits.split(",")]
    if any(x < 0 for x in splits):
        raise SystemExit(f"--splits: factors must be >= 0, got {args.splits}")
    tiles = sweep_configs(args.tiny, args.configs)
    copy_gbps = copy_bandwidth(device) if device.type == "cuda" else float("nan")  # GB/s
    t_start = time.time()
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "copy_gbps": copy_gbps, "dtype": "bfloat16", "replays": args.replays, "splits": splits, **versions(),
    }  # fmt: skip
    rows: list[dict[str, Any]] = []
    gpu = meta["gpu"].split()[-1].lower() if device.type == "cuda" else "cpu"
    out_path = Path(args.out) / f"projection_kernels_{gpu}.json"

    def r(*shape: int, std: float = 1.0) -> Any:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    for name, (n, k, epi) in shapes.items():
        gated = epi == "gated"
        w_bytes = n * k * 2 * (2 if gated else 1)
        sets = 1 if device.type != "cuda" else max(1, min(32, -(-L2_ROTATE_BYTES // w_bytes)))
        weights = [(r(n, k, std=k**-0.5), r(n, k, std=k**-0.5) if gated else None) for _ in range(sets)]
        for b in batches:
            xs = [r(b, k) for _ in range(sets)]
            res = [r(b, n) if epi == "residual" else None for _ in range(sets)]
            moved = w_bytes + b * k * 2 + b * n * 2 * (2 if epi == "residual" else 1)

            def call(i: int, backend: str, cfg: dict[str, int] | None = None, weights: list = weights,
                     gated: bool = gated, xs: list = xs, res: list = res) -> Any:  # fmt: skip
                w, w2 = weights[i]
                if gated:
                    return L.gated_linear(xs[i], w, w2, backend=backend, config=cfg)
                return L.linear(xs[i], w, residual=res[i], backend=backend, config=cfg)

            refs = [call(i, "torch") for i in range(sets)]
            variants: list[tuple[str, dict[str, int] | None]] = [("torch", None), ("default", None)]
            sweep = with_splits([c for c in tiles if smem_fits(c, gated)], splits, n, k, sm_count(device))
            variants += [("triton", c) for c in sweep]
            for variant, cfg in variants:
                backend = "torch" if variant == "torch" else "triton"
                row: dict[str, Any] = {"shape": name, "N": n, "K": k, "epilogue": epi, "batch": b,
                                       "variant": variant, "config": cfg or (None if variant == "torch" else
                                       L.skinny_config(n, k, gated, epi == "residual")), "bytes": moved}  # fmt: skip
                try:
                    got = call(0, backend, cfg)
                    row["rel_err"] = float((got.float() - refs[0].float()).abs().max() / refs[0].float().abs().max())
                    if device.type == "cuda":

                        def all_sets(backend: str = backend, cfg: dict[str, int] | None = cfg, sets: int = sets) -> None:
                            for i in range(sets):
                                call(i, backend, cfg)

                        ms = statistics.median(time_graph(all_sets, device, args.replays)) / sets
                        row["us"] = ms * 1000
                        row["gbps"] = moved / ms / 1e6
                        row["fraction_of_copy"] = row["gbps"] / copy_gbps
                except Exception as e:  # a config that does not compile or fit is recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
            timed = [x for x in rows if x["shape"] == name and x["batch"] == b and "us" in x]
            tri = [x for x in timed if x["variant"] == "triton"]
            base = next((x for x in timed if x["variant"] == "torch"), None)
            if tri and base:
                best = min(tri, key=lambda x: x["us"])
                rows.append({**best, "variant": "best"})
                dflt = next((x for x in timed if x["variant"] == "default"), None)
                print(f"{name:32s} B={b:3d} torch {base['us']:8.1f} us {base['fraction_of_copy']:5.1%} | "
                      f"default {dflt['us'] if dflt else float('nan'):8.1f} us | best {best['us']:8.1f} us "
                      f"{best['fraction_of_copy']:5.1%} SPLIT {best['config'].get('SPLIT', 1)} {best['config']} "
                      f"err {best['rel_err']:.1e}", flush=True)  # fmt: skip
            elif device.type != "cuda":
                print(name, b, [(x["variant"], (x["config"] or {}).get("SPLIT"), x.get("rel_err"), x.get("error"))
                                for x in rows[-len(variants):]])  # fmt: skip
            write_json_atomic(out_path, {"meta": {**meta, "wall_s": time.time() - t_start}, "rows": rows})
    # RMSNorm over the hidden size
    d = 5120 if not args.tiny else 256
    norm_w = r(d)
    for b in batches:
        xs = [r(b, d) for _ in range(8)]
        ref = rms_norm(xs[0], norm_w, 1e-5, backend="torch")
        for variant in ("torch", "triton"):
            row = {"shape": f"rms_norm [{b}, {d}]", "batch": b, "variant": variant, "bytes": 2 * b * d * 2 + 2 * d}
            got = rms_norm(xs[0], norm_w, 1e-5, backend=variant)
            row["rel_err"] = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
            if device.type == "cuda":

                def norms(variant: str = variant, xs: list = xs) -> None:
                    for x in xs:
                        rms_norm(x, norm_w, 1e-5, backend=variant)

                row["us"] = statistics.median(time_graph(norms, device, args.replays)) / len(xs) * 1000
            rows.append(row)
            print(row, flush=True)
    write_json_atomic(out_path, {"meta": {**meta, "wall_s": time.time() - t_start}, "rows": rows})
    print(f"wrote {out_path} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
