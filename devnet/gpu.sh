#!/usr/bin/env bash
# The dev supernet's GPU calls (see devnet/README.md). Run from the repo root on the device machine:
#   bash devnet/gpu.sh preflight # kernel paths checked, fla autotuned (~3-4 min)          -> $OUT/preflight.json
#   bash devnet/gpu.sh call1     # preflight + teacher (4 min budget)                      -> $OUT/devnet-call1.*
#   bash devnet/gpu.sh call2     # preflight + distillation (5 min)                        -> $OUT/devnet-call2.*
#   bash devnet/gpu.sh finish    # evidence + stability + issue 6's dataset (warm machine) -> $OUT/devnet-{evidence,dataset}.*
#   DEVNET_RUN=out/gpu/run-b bash devnet/gpu.sh call2   # a second distillation run beside the shipped one
#   bash devnet/gpu.sh finish-b  # run B's final + snapshots on the shared prefix, then the shipped final continued
#   bash devnet/gpu.sh final     # the shipped final's campaign continued (fresh machine; carry .whl and out/carry)
#   bash devnet/gpu.sh recheck   # the first RECHECK_N shipped-final placements scored again from scratch (speed, equality)
#   bash devnet/gpu.sh throughput  # `placement-search throughput --measure` vs the table's prediction (TP_CASES)
#   bash devnet/gpu.sh dry-run   # the dry run on the GPU (real kernels, tiny batches), ~2-3 min
#   bash devnet/gpu.sh py SCRIPT [ARGS]  # a script with this set-up (the calls share T0: chain with ';' in one command)
# Needs `.whl` carried (fla_core-0.6.0 wheel; `finish` also needs lm-eval's wheels). Since session 15 the working tree
# and all of `.whl` together pass the device's 64 MiB: name the wheels a call needs in carry instead (the kernels:
# .whl/fla_core-*, .whl/einops-*; `throughput` also .whl/jsonschema-*, jsonschema_specifications-*, referencing-*,
# rpds_py-*; each file by its exact name, one carry path each). Each command is wrapped in
# `timeout` so the call ends (and packs what exists) before the device's 10-minute limit even if a stage overran.
set -uo pipefail
what=${1:?preflight, call1, call2, finish, finish-b, final, recheck, throughput, dry-run or py}
T0=${GPU_CALL_T0:-$(date +%s)}  # chained invocations in one call: export GPU_CALL_T0=$(date +%s) first
CALL_S=${CALL_S:-570}  # the whole call's budget (the device stops a command at 600 s)
left() { echo $(( CALL_S - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fla_core-0.6.0-*.whl || exit 3
# the repo's layout installs kernels/, evaluators/, surrogate/, devnet/ under placement_search: mirror it without a build
rm -rf /tmp/ps && mkdir -p /tmp/ps/placement_search && cp -r placement_search/. /tmp/ps/placement_search/ || exit 3
for d in kernels evaluators surrogate devnet; do cp -r "$d" /tmp/ps/placement_search/ || exit 3; done
# the shipped cost tables where the package looks for them (the CLI's predictions: `throughput` without --measure)
mkdir -p /tmp/ps/results && cp -r results/cost_tables /tmp/ps/results/ || exit 3
# PYTHONSAFEPATH: `python -m` would otherwise put the repo root (whose placement_search/ lacks the subpackages) first
export PYTHONPATH=/tmp/ps:/tmp/site PYTHONSAFEPATH=1
OUT=${OUT:?OUT is set on the device machine}
log() { echo "[$(date +%T)] $*"; }
# Triton's autotuning results (fla's KDA kernels: ~3 min of benchmarking on a cold machine) persist in
# results/devnet/triton-autotune.tar.gz: restored here, and every call returns the updated set in $OUT. Triton keys
# each file by its version, the GPU target, the kernel source and the configs, so a stale one is simply not used.
export TRITON_CACHE_DIR="$PWD/out/triton-cache"
mkdir -p "$TRITON_CACHE_DIR"
[ -f results/devnet/triton-autotune.tar.gz ] && tar -xzf results/devnet/triton-autotune.tar.gz -C "$TRITON_CACHE_DIR"
save_autotune() { (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar -czf "$OUT/triton-autotune.tar.gz" -T -); }
trap save_autotune EXIT
# pack_dataset DIR NAME [EXTRA...]: DIR's campaign database (WAL folded in), speed.json, placements.csv and EXTRA
# -> $OUT/NAME.tgz
pack_dataset() {
  local dir=$1 name=$2; shift 2
  python3 -c "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()" "$dir/devnet.sqlite"
  tar -czf "$OUT/$name.tgz" -C "$dir" devnet.sqlite "$@" $(cd "$dir" && ls speed.json placements.csv 2>/dev/null)
}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', getattr(fla, '__version__', '?'))" || echo 'fla does not import: GDN/KDA would run the slow torch path'
case "$what" in
  py)
    # any script with this set-up (PYTHONPATH, Triton cache and its autotuning results), e.g.
    #   bash devnet/gpu.sh py benchmarks/profile_distill_step.py --out "$OUT/profile_distill_step_h200.json"
    shift
    # every carried wheel (lm-eval and its dependencies too, when they travelled)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    PYTHONSAFEPATH= timeout "$(( $(left) - 10 ))" python3 "$@" 2>&1 | tee -a "$OUT/devnet-py.log"  # the script's folder first (sibling imports)
    exit "${PIPESTATUS[0]}" ;;
  preflight)
    # every mixer's kernel path checked against the fp32 reference, and fla's KDA kernels autotuned (~3 min on a
    # cold Triton cache): -> $OUT/preflight.json and $OUT/triton-autotune.tar.gz (copy both into results/devnet/)
    log "preflight"
    timeout "${PREFLIGHT_TIMEOUT:-400}" python3 -m placement_search.devnet preflight --out results/devnet 2>&1 \
      | tee "$OUT/devnet-preflight.log"
    rc=${PIPESTATUS[0]}
    cp results/devnet/preflight.json "$OUT/" 2>/dev/null
    exit "$rc" ;;
  call1)
    log "call 1: corpus check + preflight + teacher"
    timeout 470 python3 -m placement_search.devnet train --out results/devnet --device cuda \
      --stages corpus,teacher 2>&1 | tee "$OUT/devnet-call1.log"
    rc=${PIPESTATUS[0]}
    log "train exit $rc; packing"
    python3 -m placement_search.devnet pack --out results/devnet --dest "$OUT" --call 1
    exit "$rc" ;;
  call2)
    # distillation only (the preflight, with fla's KDA autotuning on a cold Triton cache, comes first: ~3 min);
    # the whole run directory stays on this machine under out/gpu/ (ignored, so it survives while the machine is
    # warm) for `finish`, which must be the next call. DEVNET_RUN (default results/devnet) puts the run elsewhere
    # (a second run beside the shipped supernet: its inputs are copied from results/devnet). The teacher comes
    # from results/devnet/teacher, or is rebuilt from results/devnet/teacher-overlay (its attention tensors,
    # 4.8 MB) over the shipped supernet's frozen ones (bit-identical; devnet/snapshots.py checks a fingerprint).
    # DEVNET_STEPS fixes the distillation's length (`train --distill-steps`; the shipped run took 405 steps).
    RUN=${DEVNET_RUN:-results/devnet}
    if [ "$RUN" != results/devnet ]; then
      mkdir -p "$RUN" || exit 3
      for f in settings.json corpus.npz corpus-manifest.json tokenizer teacher teacher-log.jsonl summary.json preflight.json; do
        [ -e "results/devnet/$f" ] && cp -r "results/devnet/$f" "$RUN/"
      done
    fi
    if [ ! -f "$RUN/teacher/config.json" ] && [ -f results/devnet/teacher-overlay/snapshot.json ]; then
      log "teacher rebuilt from results/devnet/teacher-overlay over results/devnet/supernet"
      python3 -c "import sys; from placement_search.devnet.snapshots import materialize_snapshot as m; m(*sys.argv[1:])" \
        results/devnet/teacher-overlay results/devnet/supernet "$RUN/teacher" || exit 3
    fi
    log "call 2: preflight + distillation -> $RUN"
    timeout "$(( $(left) - 25 ))" python3 -m placement_search.devnet train --out "$RUN" --device cuda \
      --stages corpus,supernet ${DEVNET_STEPS:+--distill-steps "$DEVNET_STEPS" --overwrite-settings} 2>&1 \
      | tee "$OUT/devnet-call2.log"
    rc=${PIPESTATUS[0]}
    log "train exit $rc; packing"
    python3 -m placement_search.devnet pack --out "$RUN" --dest "$OUT" --call 2
    rm -rf out/gpu/devnet && mkdir -p out/gpu && cp -r "$RUN" out/gpu/devnet && ls out/gpu/devnet
    exit "$rc" ;;
  finish-b)
    # after `DEVNET_RUN=... call2` on this warm machine: run B's final checkpoint and its 4 snapshots on the shared
    # prefix of the placement list (the ranking-stability study), with the packs of the shipped dataset (carried:
    # out/dataset holds tasks-a, tasks-b and devnet.sqlite); then the shipped final continued: the noise set first,
    # then the placements left. SHARED (default 320) placements; B_BUDGET seconds for run B (default: half the call);
    # BATCH sequences per forward (default 128). out/dataset may travel packed: carry out/carry/devnet-dataset.tgz
    # (the 1 MB the dataset call returned) instead of the 10 MB folder.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
    [ -f out/gpu/devnet/supernet/config.json ] || { echo "no run B here (out/gpu/devnet is gone)"; exit 9; }
    if [ ! -f out/dataset/devnet.sqlite ] && [ -f out/carry/devnet-dataset.tgz ]; then
      mkdir -p out/dataset && tar -xzf out/carry/devnet-dataset.tgz -C out/dataset || exit 3
    fi
    [ -f out/dataset/tasks-a/pack.json ] && [ -f out/dataset/devnet.sqlite ] || { echo "carry out/carry or out/dataset"; exit 9; }
    mkdir -p out/gpu/dataset-b && cp -r out/dataset/tasks-a out/dataset/tasks-b out/gpu/dataset-b/
    budget=$(( ${B_BUDGET:-$(( ($(left) - 150) / 2 ))} ))
    log "run B: final + snapshots on ${SHARED:-320} shared placements, budget ${budget} s"
    timeout "$(( budget + 60 ))" python3 -m placement_search.devnet dataset --supernet out/gpu/devnet/supernet \
      --snapshots out/gpu/devnet --work out/gpu/dataset-b --final-limit "${SHARED:-320}" --shared "${SHARED:-320}" \
      --noise 0 --stages final,snapshots --budget "$budget" --batch-size "${BATCH:-128}" --quiet 2>&1 \
      | tee "$OUT/devnet-dataset-b.log"
    if [ "${SHIPPED:-1}" = 0 ]; then  # run B's part only
      pack_dataset out/gpu/dataset-b devnet-dataset-b
      exit 0
    fi
    budget=$(( $(left) - 75 )); tmo=$(( $(left) - 15 ))
    log "shipped final: noise set, then the rest: budget ${budget} s"
    timeout "$tmo" python3 -m placement_search.devnet dataset --supernet results/devnet/supernet --work out/dataset \
      --stages noise,final --budget "$budget" --batch-size "${BATCH:-128}" --quiet 2>&1 | tee "$OUT/devnet-dataset.log"
    rc=${PIPESTATUS[0]}
    pack_dataset out/gpu/dataset-b devnet-dataset-b
    pack_dataset out/dataset devnet-dataset tasks-a tasks-b
    ls -la "$OUT"
    exit "$rc" ;;
  throughput)
    # `placement-search throughput --measure` on this GPU at the 15B sizes, beside the shipped table's prediction for
    # the same placement and conditions (issue 4's CLI on a GPU) -> $OUT/throughput-check.jsonl
    # every carried wheel: the CLI needs jsonschema (and its referencing, rpds-py, specifications) beside fla
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    cases=${TP_CASES:-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@16384@fixed:16 SSSSSSSSGGGGGGGGKKKKKKKKAAAAAAAASSSSSSSSGGGGGGGG@32768@fixed:16 GKSAGKSAGKSAGKSAGKSAGKSAGKSAGKSAGKSAGKSAGKSAGKSA@32768@max_fit}
    for spec in $cases; do
      IFS=@ read -r code ctx pol <<< "$spec"
      [ "$(left)" -gt 60 ] || { log "out of time before $code"; break; }
      for how in --measure ""; do
        log "throughput $code $ctx $pol ${how:-predict}"
        timeout "$(( $(left) - 10 ))" python3 -m placement_search throughput "$code" --context "$ctx" \
          --batch-policy "$pol" $how --json > /tmp/tp.json 2> >(tee -a "$OUT/throughput-check.log" >&2) \
          && python3 -c "import json, sys; print(json.dumps(json.load(open('/tmp/tp.json'))))" >> "$OUT/throughput-check.jsonl"
        tail -c 400 /tmp/tp.json; echo
      done
    done
    exit 0 ;;
  recheck)
    # the shipped final's first RECHECK_N (default 400) placements scored again into an empty database with the
    # shipped packs (carried in out/carry/devnet-dataset.tgz), in code order over ORDER_WINDOW (default: all of them):
    # the campaign speed with the shipped settings, and the scores to compare with the shipped table
    # (`python -m placement_search.devnet recheck`) -> $OUT/devnet-recheck.tgz
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
    [ -f out/carry/devnet-dataset.tgz ] || { echo "carry out/carry"; exit 9; }
    rm -rf out/gpu/recheck && mkdir -p out/gpu/recheck && tar -xzf out/carry/devnet-dataset.tgz -C out/gpu/recheck tasks-a tasks-b || exit 3
    n=${RECHECK_N:-400}
    budget=$(( $(left) - 40 )); tmo=$(( $(left) - 10 ))
    log "recheck: ${n} placements, budget ${budget} s"
    timeout "$tmo" python3 -m placement_search.devnet dataset --supernet results/devnet/supernet --work out/gpu/recheck \
      --stages final --noise 0 --final-limit "$n" --order-window "${ORDER_WINDOW:-$n}" --budget "$budget" \
      --batch-size "${BATCH:-128}" --quiet 2>&1 | tee "$OUT/devnet-recheck.log"
    rc=${PIPESTATUS[0]}
    pack_dataset out/gpu/recheck devnet-recheck
    exit "$rc" ;;
  final)
    # the shipped final's campaign continued on a fresh machine (no run B needed): STAGES (default noise,final)
    # with the packs and database carried in out/carry/devnet-dataset.tgz -> $OUT/devnet-dataset.tgz
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
    if [ ! -f out/dataset/devnet.sqlite ] && [ -f out/carry/devnet-dataset.tgz ]; then
      mkdir -p out/dataset && tar -xzf out/carry/devnet-dataset.tgz -C out/dataset || exit 3
    fi
    [ -f out/dataset/tasks-a/pack.json ] && [ -f out/dataset/devnet.sqlite ] || { echo "carry out/carry or out/dataset"; exit 9; }
    budget=$(( $(left) - 60 )); tmo=$(( $(left) - 15 ))
    log "shipped final: ${STAGES:-noise,final}, budget ${budget} s"
    timeout "$tmo" python3 -m placement_search.devnet dataset --supernet results/devnet/supernet --work out/dataset \
      --stages "${STAGES:-noise,final}" --budget "$budget" --batch-size "${BATCH:-128}" --quiet 2>&1 | tee "$OUT/devnet-dataset.log"
    rc=${PIPESTATUS[0]}
    pack_dataset out/dataset devnet-dataset tasks-a tasks-b
    exit "$rc" ;;
  finish)
    # evidence + ranking stability (issue 5), then issue 6's dataset: packs + campaigns at the final and the
    # intermediate checkpoints (devnet/dataset.py). Needs call 2's out/gpu/devnet (a warm machine); without it, the
    # supernet that travelled (final only: no teacher, so no evidence; no snapshots).
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
    snaps=()
    if [ -f out/gpu/devnet/supernet/config.json ]; then
      cp -r out/gpu/devnet/. results/devnet/  # call 2's run directory as it ended (summary.json included)
      log "evidence + stability"
      timeout "${EVIDENCE_TIMEOUT:-150}" python3 -m placement_search.devnet train --out results/devnet --device cuda \
        --stages corpus,evidence,stability 2>&1 | tee "$OUT/devnet-evidence.log"
      tar -czf "$OUT/devnet-evidence.tgz" -C results/devnet $(cd results/devnet && ls evidence.json evidence.md \
        stability.json stability.md summary.json preflight.json distill-log.jsonl supernet-init.json 2>/dev/null)
      snaps=(--snapshots results/devnet)
    elif [ ! -f results/devnet/supernet/config.json ]; then echo "no supernet here (out/gpu/ is gone, none travelled)"; exit 9; fi
    # the campaigns get what is left of the call, less packing (~10 s) and the packs / model / task set-up (~60 s)
    budget=$(( $(left) - 75 )); tmo=$(( $(left) - 12 ))
    log "dataset ${snaps[*]}: budget ${budget} s, timeout ${tmo} s"
    timeout "$tmo" python3 -m placement_search.devnet dataset --supernet results/devnet/supernet \
      "${snaps[@]}" --work out/gpu/dataset --budget "$budget" --quiet 2>&1 | tee "$OUT/devnet-dataset.log"
    rc=${PIPESTATUS[0]}
    pack_dataset out/gpu/dataset devnet-dataset tasks-a tasks-b
    ls -la "$OUT"
    exit "$rc" ;;
  dry-run)
    timeout 480 python3 -m placement_search.devnet train --dry-run --device cuda --out results/devnet 2>&1 \
      | tee "$OUT/devnet-dry-run.log"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
