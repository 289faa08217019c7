"""``python -m placement_search.devnet``: train the dev supernet end to end, or estimate its GPU time.

    python -m placement_search.devnet train --out results/devnet                  # one H200, <= 15 min
    python -m placement_search.devnet train --tiny --device cpu --out /tmp/devnet  # CPU smoke test, < 60 s
    python -m placement_search.devnet train --out results/devnet --stages corpus   # corpus + tokenizer only
    python -m placement_search.devnet estimate                                     # CPU measurement -> GPU time
    python -m placement_search.devnet train --dry-run                               # full size on CPU, 2 steps/stage + plan
    python -m placement_search.devnet pack --out results/devnet --dest $OUT --call 2  # outputs -> device return files
    python -m placement_search.devnet unpack FILES_AT --into results/devnet         # check, extract, rebuild supernet/

See devnet/README.md for the GPU commands.
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
    train.add_argument("--dry-run", action="store_true",
                       help="full model size, 2 steps per stage, tiny batches/sequences (CPU unless --device), "
                            "snapshot and pack checks; prints the GPU plan; --out is the shipped run to read")
    pk = sub.add_parser("pack", help="pack a run's outputs for the device's return limits (8 files, 16/64 MiB)")
    pk.add_argument("--out", default="results/devnet", help="run directory")
    pk.add_argument("--dest", required=True, help="where the parts go ($OUT on the device)")
    pk.add_argument("--call", type=int, choices=(1, 2), required=True, help="which GPU call's outputs")
    up = sub.add_parser("unpack", help="check and extract packed parts; rebuild supernet/ from the teacher")
    up.add_argument("src", help="folder with the parts and their .json manifests (the device's files_at)")
    up.add_argument("--into", default="results/devnet", help="run directory to extract into")
    ds = sub.add_parser("dataset", help="task packs + campaigns at the final and intermediate checkpoints (GPU)")
    ds.add_argument("--supernet", default="results/devnet/supernet", help="final supernet directory")
    ds.add_argument("--snapshots", default=None, help="folder holding supernet-step*/ snapshots (none: final only)")
    ds.add_argument("--devnet", default="results/devnet", help="run directory with corpus.npz")
    ds.add_argument("--work", required=True, help="where the packs, devnet.sqlite and speed.json go")
    ds.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    ds.add_argument("--batch-size", type=int, default=128, help="sequences per forward (default 128)")
    ds.add_argument("--budget", type=float, default=450.0, help="seconds after which no placement starts")
    ds.add_argument("--noise", type=int, default=40, help="placements re-scored on pack B (default 40)")
    ds.add_argument("--shared", type=int, default=320, help="placements scored at every snapshot (default 320)")
    ds.add_argument("--final-limit", type=int, default=None, metavar="N",
                    help="plan only the first N placements of the list (default all)")
    ds.add_argument("--order-window", type=int, default=256, metavar="N",
                    help="evaluate each N placements still to do in code order (shared leading layers are not "
                         "recomputed on CUDA; 0: list order; default 256)")
    ds.add_argument("--stages", default="final,noise,snapshots",
                    help="campaigns to run, in order: final, noise, snapshots (default final,noise,snapshots)")
    ds.add_argument("--placements", default=None, metavar="SPEC",
                    help="sampler mix, e.g. structured:400,stratified:700,uniform:700 (default: the shipped mix)")
    ds.add_argument("--quiet", action="store_true", help="no progress bars")
    pf = sub.add_parser("preflight", help="check every mixer's GPU kernel path (and autotune fla) -> preflight.json")
    pf.add_argument("--out", default="results/devnet", help="run directory (default results/devnet)")
    pf.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    ex = sub.add_parser("dataset-export", help="the shipped tables from a dataset run's database (CPU)")
    ex.add_argument("--work", required=True, help="the dataset run's folder (devnet.sqlite, tasks-a/, placements.csv)")
    ex.add_argument("--out", default="results/evaluations", help="where the tables go (default results/evaluations)")
    ex.add_argument("--name", default="devnet", help="file name prefix (default devnet: devnet-final.csv, ...)")
    st = sub.add_parser("stability", help="ranking stability across checkpoints from the exported tables (CPU)")
    st.add_argument("--run", default="results/evaluations/devnet-run-c-evaluations.csv.gz",
                    help="tidy table of a run's final and intermediate checkpoints")
    st.add_argument("--shipped", default="results/evaluations/devnet-final.csv",
                    help="wide table of the shipped final checkpoint (compared too)")
    st.add_argument("--out", default="results/devnet/stability", help="writes OUT.json and OUT.md")
    rc = sub.add_parser("recheck", help="a re-scored run (gpu.sh recheck) vs the shipped table, value by value (CPU)")
    rc.add_argument("--work", required=True, help="the run's folder (devnet.sqlite, speed.json, tasks-a/)")
    rc.add_argument("--reference", default="results/evaluations/devnet-evaluations.csv.gz",
                    help="the shipped tidy table (default results/evaluations/devnet-evaluations.csv.gz)")
    rc.add_argument("--out", default="results/evaluations/devnet-recheck.json", help="JSON report")
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
    if args.command == "preflight":
        from pathlib import Path

        from placement_search.devnet.config import model_spec
        from placement_search.devnet.train import prepare_gpu

        out = Path(args.out)
        settings = Settings.from_dict(json.loads((out / "settings.json").read_text(encoding="utf-8")))
        (out / "preflight.json").unlink(missing_ok=True)
        print(json.dumps(prepare_gpu(out, model_spec(settings.size), torch.device(args.device))))
        return 0
    if args.command in ("stability", "recheck", "dataset-export", "dataset"):
        from placement_search.devnet import dataset as D
        from placement_search.errors import PlacementSearchError

        verbs = {
            "stability": lambda: D.stability_report(args.run, args.shipped, args.out),
            "recheck": lambda: D.recheck_report(args.work, args.reference, args.out),
            "dataset-export": lambda: D.export(args.work, args.out, name=args.name),
            "dataset": lambda: D.main(args),
        }
        try:
            return verbs[args.command]()
        except PlacementSearchError as e:  # bad input: one line, exit 2
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "pack":
        return _pack(args)
    if args.command == "unpack":
        from placement_search.devnet.transport import unpack

        manifests = unpack(args.src, args.into)
        print(json.dumps([{k: m[k] for k in ("name", "total_bytes", "optional_taken", "optional_left_out")}
                          for m in manifests], indent=2))  # fmt: skip
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry_run:
        from placement_search.devnet.dryrun import dry_run

        report = dry_run(args.out, "cpu" if args.device == "auto" else device)
        print(json.dumps(report, indent=2, default=str))
        ok = report["snapshot_overlay_equals_materialized"] and report["unpacked_supernet_equals_final"]
        return 0 if ok else 1
    try:
        summary = run_pipeline(args.out, _settings(args), device, stages=[s for s in args.stages.split(",") if s],
                               overwrite_settings=args.overwrite_settings)  # fmt: skip
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary.get(k) for k in ("timings_s", "teacher", "supernet", "evidence_checks")},
                     indent=2, default=str))  # fmt: skip
    return 0


def _pack(args: argparse.Namespace) -> int:
    """Pack call 1 (teacher) or call 2 (final supernet as a delta over the teacher + snapshots) into --dest."""
    from pathlib import Path

    from placement_search.devnet.dryrun import CALL1_ENTRIES, CALL2_ENTRIES, snapshot_priority
    from placement_search.devnet.snapshots import is_snapshot, snapshot_from_checkpoint
    from placement_search.devnet.transport import FINAL_DELTA, pack
    from placement_search.files import load_json

    out = Path(args.out)
    if args.call == 1:
        required = [e for e in CALL1_ENTRIES if (out / e).exists()]
        manifest = pack(out, args.dest, "devnet-call1", required)
    else:
        info = load_json(out / "supernet" / "devnet.json") if (out / "supernet" / "devnet.json").exists() else {}
        snapshot_from_checkpoint(out / "supernet", out / FINAL_DELTA, info)
        steps = sorted(int(p.name.removeprefix("supernet-step")) for p in out.glob("supernet-step*") if is_snapshot(p))
        optional = [f"supernet-step{s:06d}" for s in snapshot_priority(steps)]
        required = [e for e in CALL2_ENTRIES if (out / e).exists()]
        manifest = pack(out, args.dest, "devnet-call2", required, optional)
    print(json.dumps({k: manifest[k] for k in ("name", "total_bytes", "optional_taken", "optional_left_out")},
                     indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
