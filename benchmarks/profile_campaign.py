"""Where an evaluation campaign spends its time on the GPU: placements per second by batch size and placement,
the forward of each batch of the scoring plan, one block of each mixer (per kernel path), and the top kernels.

The dev-supernet campaign of 2026-11-28 scored 2.05 placements/s on the H200 (issue 6's target: 5/s at >= 64K
scored tokens each). This finds what to change. Run it where the campaign runs, with the same task pack:

    python benchmarks/profile_campaign.py --supernet results/devnet/supernet --tasks out/dataset/tasks-a \\
        --out $OUT/profile_campaign.json [--batch-sizes 128,512] [--devnet results/devnet]

Writes JSON (machine, versions, command, date, sections) after every section, so a timeout keeps what finished,
and prints each table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from placement_search.files import write_json_atomic


def _sync_time(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _placements(n: int, names: list[str], seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    cases = {f"all-{m}": [m] * n for m in names}
    cases["mixed-1"] = [rng.choice(names) for _ in range(n)]
    cases["mixed-2"] = [rng.choice(names) for _ in range(n)]
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--supernet", required=True)
    ap.add_argument("--tasks", required=True, help="a task pack directory (devnet dataset: out/dataset/tasks-a)")
    ap.add_argument("--devnet", default="results/devnet", help="where preflight.json names the kernel paths")
    ap.add_argument("--batch-sizes", default="128,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="plan,graphs,forwards,blocks,kernels")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cpu only to check the script")
    args = ap.parse_args()

    from placement_search.devnet.preflight import apply_backends
    from placement_search.evaluators.campaign import CampaignTasks, load_lm_eval_tasks, score_agreement
    from placement_search.evaluators.checkpoint import load_supernet
    from placement_search.evaluators.lm_eval_model import RequestEncoder
    from placement_search.evaluators.tokenizer import load_tokenizer

    pre = Path(args.devnet) / "preflight.json"
    backends = apply_backends(json.loads(pre.read_text())["backends"] if pre.is_file() else {"gdn": "fla_kda"})
    dev = torch.device(args.device)
    model = load_supernet(args.supernet, device=dev, dtype=None if dev.type == "cuda" else torch.float32).eval().requires_grad_(False)
    n = model.spec.num_layers
    names = list(model.spec.search_space.mixers)
    cases = _placements(n, names, 0)
    tok = load_tokenizer(args.supernet)
    encoder = RequestEncoder(tok, int(model.spec.max_position_embeddings))
    report: dict[str, Any] = {
        "what": "evaluation campaign profile (benchmarks/profile_campaign.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "dtype": str(model.dtype),
        "backends": backends,
        "tasks": args.tasks,
    }
    out = Path(args.out)
    sections = args.sections.split(",")
    built_by_batch: dict[int, Any] = {}

    def built(bs: int) -> Any:
        if bs not in built_by_batch:
            tasks = load_lm_eval_tasks(args.tasks)
            built_by_batch[bs] = CampaignTasks.build(tasks, encoder, bs, {}, share_contexts=False)
        return built_by_batch[bs]

    if "plan" in sections:
        rows = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            b = built(bs)
            for case, placement in cases.items():
                model.set_placement(placement)
                t_first = _sync_time(lambda b=b: b.score(model), 1)[0]
                ts = _sync_time(lambda b=b: b.score(model), args.repeats)
                med = statistics.median(ts)
                row = {"batch": bs, "placement": case, "first_s": round(t_first, 4), "median_s": round(med, 4),
                       "placements_per_s": round(1 / med, 3), "fed_tokens": b.plan.num_tokens,
                       "scored_tokens": b.plan.scored_tokens, "forwards": len(b.plan.batches)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                report["plan"] = rows
                write_json_atomic(out, report)

    if "graphs" in sections:
        # the plan's batches through CUDA graphs (evaluators/graphs.py): capture time, agreement with eager, speed
        from placement_search.evaluators.graphs import GraphedPrefill

        rows = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            b = built(bs)
            model.set_placement(cases["mixed-1"])
            eager = b.plan.run(model)
            t0 = time.perf_counter()
            graphs = GraphedPrefill(model, b.plan.batch_shapes)
            capture_s = time.perf_counter() - t0
            graphed = b.plan.run(model, graphs)
            rel, flips = score_agreement(eager, graphed)
            for case, placement in cases.items():
                model.set_placement(placement)
                ts = _sync_time(lambda b=b, g=graphs: b.score(model, g), args.repeats + 1)[1:]
                med = statistics.median(ts)
                row = {"batch": bs, "placement": case, "median_s": round(med, 4), "placements_per_s": round(1 / med, 3),
                       "capture_s": round(capture_s, 2), "graphs": graphs.num_graphs, "shapes": len(graphs.shapes),
                       "max_rel_diff_vs_eager": rel, "greedy_flips": flips,
                       "padded_tokens": sum(r * w for r, w in b.plan.batch_shapes)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                report["graphs"] = rows
                write_json_atomic(out, report)
            del graphs
            torch.cuda.empty_cache()

    if "forwards" in sections:
        b = built(int(args.batch_sizes.split(",")[0]))
        rows = []
        for case in ("all-attention", "all-sliding_window", "all-gdn", "all-kda", "mixed-1"):
            if case not in cases:
                continue
            model.set_placement(cases[case])
            xs = b.plan._batch_tensors(dev)
            for k, (x, *_rest) in enumerate(xs):
                with torch.no_grad():
                    ts = _sync_time(lambda x=x: model(x), args.repeats + 1)[1:]
                row = {"placement": case, "forward": k, "shape": list(x.shape), "median_s": round(statistics.median(ts), 5),
                       "tokens_per_s": round(x.numel() / statistics.median(ts))}
                rows.append(row)
                print(json.dumps(row), flush=True)
        report["forwards"] = rows
        write_json_atomic(out, report)

    if "blocks" in sections:
        # one block of each mixer at the largest plan batch; the MLP + norms are the rest of a block
        import importlib

        att_mod = importlib.import_module("placement_search.kernels.attention")

        b = built(int(args.batch_sizes.split(",")[0]))
        x_ids = b.plan._batch_tensors(dev)[0][0]
        with torch.no_grad():
            h = model.model.embed_tokens(x_ids)
        positions = torch.arange(h.shape[1], device=dev)
        block = model.blocks[0]
        rows = []
        variants = [("attention", {}), ("sliding_window", {}), ("sliding_window", {"flex": True}),
                    ("gdn", {}), ("gdn", {"gdn": "fla"}), ("kda", {})]
        for name, opts in variants:
            mixer = block.mixer.mixers[name]
            saved = None
            if opts.get("gdn"):
                apply_backends({**backends, "gdn": opts["gdn"]})
            if opts.get("flex"):
                saved = att_mod.DENSE_WINDOW_MAX_T
                att_mod.DENSE_WINDOW_MAX_T = 0
            try:
                with torch.no_grad():
                    ts = _sync_time(lambda m=mixer: m(block.input_layernorm(h), positions), args.repeats + 2)[2:]
                row = {"mixer": name, **opts, "shape": list(h.shape), "median_ms": round(1e3 * statistics.median(ts), 3)}
            except Exception as e:  # a path that does not run here is a finding, not a crash
                row = {"mixer": name, **opts, "error": f"{type(e).__name__}: {e}"[:300]}
            finally:
                if saved is not None:
                    att_mod.DENSE_WINDOW_MAX_T = saved
                if opts.get("gdn"):
                    apply_backends(backends)
            rows.append(row)
            print(json.dumps(row), flush=True)
        with torch.no_grad():
            ts = _sync_time(lambda: block.mlp(block.post_attention_layernorm(h)) + h, args.repeats + 2)[2:]
            rows.append({"mixer": "mlp+norms", "shape": list(h.shape), "median_ms": round(1e3 * statistics.median(ts), 3)})
            ts = _sync_time(lambda: model.lm_head(model.model.norm(h)), args.repeats + 2)[2:]
            rows.append({"mixer": "head", "shape": list(h.shape), "median_ms": round(1e3 * statistics.median(ts), 3)})
        print(json.dumps(rows[-2:]), flush=True)
        report["blocks"] = rows
        write_json_atomic(out, report)

    if "kernels" in sections:
        from torch.profiler import ProfilerActivity, profile

        b = built(int(args.batch_sizes.split(",")[0]))
        model.set_placement(cases["mixed-1"])
        b.score(model)
        _sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            b.score(model)
            _sync()
        ka = prof.key_averages()
        by_cuda = sorted(ka, key=lambda e: -getattr(e, "self_device_time_total", 0))[:30]
        by_cpu = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:20]
        report["kernels"] = {
            "total_device_ms": round(sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3, 2),
            "total_cpu_ms": round(sum(e.self_cpu_time_total for e in ka) / 1e3, 2),
            "top_device": [{"name": e.key[:120], "calls": e.count,
                            "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 3)} for e in by_cuda],
            "top_cpu": [{"name": e.key[:120], "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)}
                        for e in by_cpu],
        }
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
        write_json_atomic(out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
