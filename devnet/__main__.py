"""``python -m placement_search.devnet``: train the dev supernet end to end, or estimate its GPU time.

    python -m placement_search.devnet train --out results/devnet                  # one H200, <= 15 min
    python -m placement_search.devnet train --tiny --device cpu --out /tmp/devnet  # CPU smoke test, < 60 s
    python -m placement_search.devnet train --out results/devnet --stages corpus   # corpus + tokenizer only
    python -m placement_search.devnet estimate                                     # CPU measurement -> GPU time
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from placement_search.devnet.config import PRESETS, Settings
from placement_search.devnet.train import STAGES, PipelineError, run_pipeline


def _settings(args: argparse.Namespace) -> Settings:
    settings = PRESETS["tiny" if args.tiny else "full"]()
    teacher, distill = settings.teacher, settings.distill
    if args.teacher_steps is not None:
        teacher = dataclasses.replace(teacher, steps=args.teacher_steps)
    if args.teacher_minutes is not None:
        teacher = dataclasses.replace(teacher, minutes=args.teacher_minutes)
    if args.distill_steps is not None:
        distill = dataclasses.replace(distill, steps=args.distill_steps)
    if args.distill_minutes is not None:
        distill = dataclasses.replace(distill, minutes=args.distill_minutes)
    return dataclasses.replace(settings, teacher=teacher, distill=distill)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m placement_search.devnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="corpus -> tokenizer -> teacher -> supernet -> evidence (resumable)")
    estimate = sub.add_parser("estimate", help="measure CPU throughput and op counts; estimate the H200 time")
    for p in (train, estimate):
        p.add_argument("--tiny", action="store_true", help="the CPU smoke-test preset")
    train.add_argument("--out", default="results/devnet", help="output directory (default results/devnet)")
    train.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    train.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    train.add_argument("--teacher-steps", type=int, help="fixed teacher steps (default: calibrated from minutes)")
    train.add_argument("--teacher-minutes", type=float, help="teacher wall-clock budget")
    train.add_argument("--distill-steps", type=int, help="fixed distillation steps")
    train.add_argument("--distill-minutes", type=float, help="distillation wall-clock budget")
    train.add_argument("--overwrite-settings", action="store_true", help="resume although the settings changed")
    estimate.add_argument("--batch", type=int, default=1, help="rows per measured CPU step")
    estimate.add_argument("--out", help="write the estimate as JSON here")
    args = parser.parse_args(argv)
    if args.command == "estimate":
        from placement_search.devnet.budget import estimate_gpu_minutes

        result = estimate_gpu_minutes(PRESETS["tiny" if args.tiny else "full"](), batch=args.batch)
        text = json.dumps(result, indent=2)
        if args.out:
            from placement_search.files import write_text_atomic

            write_text_atomic(args.out, text + "\n")
        print(text)
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        summary = run_pipeline(args.out, _settings(args), device, stages=[s for s in args.stages.split(",") if s],
                               overwrite_settings=args.overwrite_settings)  # fmt: skip
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary.get(k) for k in ("timings_s", "teacher", "supernet", "evidence_checks")},
                     indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
