"""Where the dev supernet's distillation step spends its time on the GPU: first call (compilation, autotuning)
and steady state, per mixer and kernel path.

The distillation run of 2026-11-28 (results/devnet/distill-log.jsonl) spent 223 s on its first step and then
~1.5 s per step, against ~0.4 s estimated: this measures, for all-X placements of each mixer under each kernel
path (devnet/preflight.py's PATHS) and for random mixed placements, one micro-batch (``--batch`` x ``--seq``)
of the training step: teacher forward (no grad), student forward and backward under bf16 autocast, the KL loss.
The teacher's compute is the all-attention placement's, so the supernet itself (attention placement, a frozen
copy) stands in for it: timings do not depend on weight values.

    python benchmarks/profile_distill_step.py --out $OUT/profile.json [--supernet results/devnet/supernet]

Writes JSON (machine, versions, command, date, rows) and prints a table; each row is written as soon as it is
measured, so a timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from placement_search.devnet.config import Settings, model_spec
from placement_search.devnet.distill import distill_loss
from placement_search.devnet.preflight import apply_backends
from placement_search.evaluators import Supernet, load_supernet
from placement_search.files import write_json_atomic


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--supernet", default=None,
                    help="a dev supernet checkpoint (default: random weights at the sizes of results/devnet/settings.json)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="attention:sdpa,sliding_window:flex,sliding_window:sdpa,gdn:chunk,gdn:fla,"
                    "kda:chunk,kda:fla,gdn:fla_kda,mixed:default")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    if args.supernet:
        student = load_supernet(args.supernet, device=dev, dtype=torch.float32)
    else:  # timings do not depend on weight values
        settings = Settings.from_dict(json.loads(Path("results/devnet/settings.json").read_text(encoding="utf-8")))
        student = Supernet(model_spec(settings.size), device=dev, dtype=torch.float32, seed=0)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    n = student.spec.num_layers
    teacher.set_placement(["attention"] * n)
    for name, p in student.named_parameters():
        p.requires_grad_(".mixers." in name)
    x = torch.randint(0, student.spec.vocab_size, (args.batch, args.seq), device=dev)
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "device": torch.cuda.get_device_name(), "python": platform.python_version(), "torch": torch.__version__,
              "batch": args.batch, "seq": args.seq, "rows": []}  # fmt: skip

    def step(placement: list[str]) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        student.set_placement(placement)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            t_out = teacher(x, return_hidden_states=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s_out = student(x, return_hidden_states=True)
        loss, _ = distill_loss(s_out[0], t_out[0], s_out[1], t_out[1], 0.1)
        loss.backward()
        student.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    rng = random.Random(0)
    print(f"{'case':24} {'first s':>9} {'steady s':>9}", flush=True)
    for case in args.cases.split(","):
        mixer, path = case.split(":")
        backends = {"gdn": "fla_kda"} if path == "default" else {mixer: path}
        apply_backends({"gdn": "chunk", **backends})  # fla's gated GDN backward refuses Triton < 3.7.1 on Hopper
        if mixer == "mixed":
            names = ["attention", "sliding_window", "gdn", "kda"]
            placements = [[rng.choice(names) for _ in range(n)] for _ in range(args.repeats + 1)]
        else:
            placements = [[mixer] * n] * (args.repeats + 1)
        try:
            first = step(placements[0])
            steady = [step(p) for p in placements[1:]]
            row = {"case": case, "first_s": round(first, 3), "steady_s": round(statistics.median(steady), 4)}
        except Exception as e:  # a path that fails here is recorded, the others still run
            row = {"case": case, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        record["rows"].append(row)
        write_json_atomic(Path(args.out), record)
        print(f"{case:24} {row.get('first_s', float('nan')):9.2f} {row.get('steady_s', float('nan')):9.4f}"
              f" {row.get('error', '')}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
