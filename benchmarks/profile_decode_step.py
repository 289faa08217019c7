"""Where one whole-model decode step spends its GPU time, by kernel and by kind (issue 4's batch-1 target).

The batch-1 step of Super Apriel 15B took 1.87-2.38x the time to read the weights once
(results/engine_efficiency_h200.json; target <= 1.25x). This profiles the step of thin random 15B models (only the
placement's mixers) at ``--context`` and ``--batch`` with torch.profiler on eager replays (CUDA-graph replays hide
the kernels), and groups the CUDA kernel time: matrix-vector products (the weight reads), attention decode,
GDN/KDA decode, and everything else (norms, RoPE, activations, copies). Next to it: the CUDA-graph step time
(what the throughput benchmarks measure), the weight bytes and the weight-read time at the copy bandwidth measured
in the same run. The skinny projections are also split by their role in the block (``skinny_by_role``: the mixer's
input and output projections, the MLP's gate/up and down, the LM head; from the trace's launch order), to see
which of them lose time where batch 16 is slower than batch 1.

    python benchmarks/profile_decode_step.py --out results/decode_step_profile_h200.json \\
        --placements all-attention,all-gdn,all-kda,all-swa,mixed --batch 1,16 --context 32768 [--attention-decode triton]

Writes JSON (machine, versions, command, date, one record per placement) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from placement_search.evaluators import Supernet, mixers_for
from placement_search.evaluators import throughput as T
from placement_search.files import write_json_atomic
from placement_search.spec import get_spec

KINDS = (
    ("gemv/gemm", ("gemv", "gemm", "sm90_xmma", "cutlass", "ampere_bf16", "nvjet", "splitk", "skinny_linear")),
    ("attention decode", ("flash", "fmha", "attention", "sdpa", "_decode_split", "_decode_merge", "cudnn")),
    ("gdn/kda decode", ("gdn_state", "gdn_finish", "kda_state", "kda_finish", "fused_recurrent", "delta")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 10 eager copies."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 2 / statistics.median(times[2:])


#: Eager decode steps under the profiler; every figure is per step.
PROFILED_STEPS = 5


def profile_one(spec, label: str, context: int, batch: int, device: torch.device) -> dict:
    names = {"all-attention": "attention", "all-swa": "sliding_window", "all-gdn": "gdn", "all-kda": "kda"}
    if label == "mixed":  # A S G K repeated, as the engine-efficiency benchmark's mixed placement
        order = list(spec.mixer_names)
        placement = [order[i % len(order)] for i in range(spec.num_layers)]
    else:
        placement = [names[label]] * spec.num_layers
    model = Supernet(spec, mixers_for(spec, [placement]), device=device, dtype=torch.bfloat16, seed=0).eval()
    model.set_placement(placement)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    cache = model.new_cache(batch, context)
    pos0 = T.prepare_cache(cache, context, gen)
    token = torch.randint(0, spec.vocab_size, (batch,), device=device, generator=gen)
    step = T.decode_step_fn(model, cache, token, pos0, context)
    with torch.no_grad():
        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        captured = T.CapturedStep(step, device)
        graph_ms = round(captured.time(20).ms, 4)
        captured.close()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(PROFILED_STEPS):
                step()
            torch.cuda.synchronize(device)
    roles = skinny_by_role(prof, PROFILED_STEPS, spec.num_layers)
    by_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if dev_us and ev.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[ev.key] += dev_us / PROFILED_STEPS
            counts[ev.key] += ev.count // PROFILED_STEPS
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in by_kernel.items():
        by_kind[kind_of(name)] += us
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]
    del cache, model
    T.free_memory(device)
    return {
        "placement": label, "context": context, "batch": batch, "weight_bytes": weight_bytes,
        "graph_step_ms": graph_ms, "eager_kernel_ms": sum(by_kernel.values()) / 1000,
        "kernels_per_step": sum(counts.values()),
        "by_kind_ms": {k: round(v / 1000, 4) for k, v in sorted(by_kind.items())},
        "top_kernels": [{"name": n[:120], "ms": round(us / 1000, 4), "calls": counts[n]} for n, us in top],
        "skinny_by_role": roles,
    }  # fmt: skip


#: The skinny projections of one block, in launch order: the mixer's packed input projection, its output projection
#: (+ residual), the MLP's gate/up and its down projection (+ residual); the step's last is the LM head.
ROLES = ("mixer in", "mixer out", "mlp gate/up", "mlp down")


def skinny_by_role(prof, steps: int, layers: int) -> dict[str, dict]:
    """Per step, the skinny projection kernels' device time by role in the block (``ROLES``, by launch order, with
    KDA's gate pair where every block has five; the last of a step is the LM head), from the profiler's trace:
    calls, total and mean microseconds, grid. Empty where the blocks launch different numbers of projections (a
    mixed placement with KDA layers), whose roles launch order alone cannot tell apart."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    skinny = sorted((e for e in events if e.get("cat") == "kernel" and e.get("name") == "skinny_linear_kernel"),
                    key=lambda e: e["ts"])  # fmt: skip
    per_step = len(skinny) // steps if steps else 0
    per_layer, rest = divmod(per_step - 1, layers)
    if per_step < 1 or rest:  # blocks launching different numbers of projections (a mixed placement with KDA)
        return {}
    roles = ROLES
    if per_layer == len(ROLES) + 1:  # all-KDA: linear_pair after the input projection
        roles = (ROLES[0], "mixer gates (KDA pair)", *ROLES[1:])
    elif per_layer != len(ROLES):
        roles = tuple(f"projection {j} of the block" for j in range(max(per_layer, 1)))
    out: dict[str, dict] = {}
    for i, ev in enumerate(skinny[: per_step * steps]):
        j = i % per_step
        role = "lm head" if j == per_step - 1 else roles[j % len(roles)]
        r = out.setdefault(role, {"calls": 0, "us": 0.0, "grid": ev.get("args", {}).get("grid")})
        r["calls"] += 1
        r["us"] += float(ev.get("dur", 0.0))
    for r in out.values():
        r["mean_us"] = round(r["us"] / r["calls"], 3)
        r["calls"] //= steps
        r["us"] = round(r["us"] / steps, 2)
    return out


def add_step_args(ap: argparse.ArgumentParser, placements: str, batch: str) -> None:
    """The options every whole-step benchmark takes: output file, placements, context and batch sizes."""
    ap.add_argument("--out", required=True)
    ap.add_argument("--placements", default=placements, help="comma list of all-attention, all-swa, all-gdn, "
                    "all-kda and mixed")  # fmt: skip
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", default=batch, help="batch size, or a comma list (one row per placement and batch)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, "all-attention,all-gdn,all-kda,all-swa", "1")
    ap.add_argument("--attention-decode", choices=("sdpa", "sdpa_grouped", "triton"), default=None)
    ap.add_argument("--split", type=int, default=None, help="split-K of every skinny projection (0: split_for)")
    ap.add_argument("--no-split-k-outputs", action="store_true",
                    help="unsplit tiles for the output / MLP down projections (projection.SPLIT_K_OUTPUT_PROJECTIONS)")
    args = ap.parse_args()
    from placement_search.kernels import projection as kp

    kp.SPLIT_OVERRIDE = args.split
    kp.SPLIT_K_OUTPUT_PROJECTIONS = not args.no_split_k_outputs
    if args.attention_decode:
        from placement_search.kernels import backend as kb

        kb.AUTO_CUDA_DECODE_BACKEND = args.attention_decode
    device = torch.device("cuda")
    spec = get_spec("super-apriel-15b")
    bw = copy_bandwidth(device)
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "device": torch.cuda.get_device_name(device), "python": platform.python_version(),
              "torch": torch.__version__, "copy_bandwidth_gbs": round(bw / 1e9, 1),
              "attention_decode": args.attention_decode or "auto (sdpa)", "split": args.split, "split_k_outputs": not args.no_split_k_outputs, "rows": []}  # fmt: skip
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    for label, batch in [(p, int(b)) for p in args.placements.split(",") for b in args.batch.split(",")]:
        try:
            row = profile_one(spec, label, args.context, batch, device)
        except Exception as e:  # one failing placement does not lose the others
            row = {"placement": label, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if "weight_bytes" in row:
            row["weight_read_ms"] = round(row["weight_bytes"] / bw * 1000, 4)  # at the copy rate (bytes read + written / s)
        record["rows"].append(row)
        write_json_atomic(Path(args.out), record)
        print(row.get("placement"), row.get("batch"), {k: row.get(k) for k in ("graph_step_ms", "weight_read_ms", "eager_kernel_ms",
                                                            "kernels_per_step", "by_kind_ms", "error")}, flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
