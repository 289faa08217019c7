#!/usr/bin/env bash
# The dev supernet's GPU calls (see devnet/README.md). Run from the repo root on the device machine:
#   bash devnet/gpu.sh preflight # kernel paths checked, fla autotuned (~3-4 min)          -> $OUT/preflight.json
#   bash devnet/gpu.sh call1     # preflight + teacher (4 min budget)                      -> $OUT/devnet-call1.*
#   bash devnet/gpu.sh call2     # preflight + distillation (5 min)                        -> $OUT/devnet-call2.*
#   bash devnet/gpu.sh finish    # evidence + stability + issue 6's dataset (warm machine) -> $OUT/devnet-{evidence,dataset}.*
#   bash devnet/gpu.sh dry-run   # the dry run on the GPU (real kernels, tiny batches), ~2-3 min
#   bash devnet/gpu.sh py SCRIPT [ARGS]  # a script with this set-up (the calls share T0: chain with ';' in one command)
# Needs `.whl` carried (fla_core-0.6.0 wheel; `finish` also needs lm-eval's wheels). Each command is wrapped in
# `timeout` so the call ends (and packs what exists) before the device's 10-minute limit even if a stage overran.
set -uo pipefail
what=${1:?preflight, call1, call2, finish or dry-run}
T0=${GPU_CALL_T0:-$(date +%s)}  # chained invocations in one call: export GPU_CALL_T0=$(date +%s) first
CALL_S=${CALL_S:-570}  # the whole call's budget (the device stops a command at 600 s)
left() { echo $(( CALL_S - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fla_core-0.6.0-*.whl || exit 3
# the repo's layout installs kernels/, evaluators/, surrogate/, devnet/ under placement_search: mirror it without a build
rm -rf /tmp/ps && mkdir -p /tmp/ps/placement_search && cp -r placement_search/. /tmp/ps/placement_search/ || exit 3
for d in kernels evaluators surrogate devnet; do cp -r "$d" /tmp/ps/placement_search/ || exit 3; done
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
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', getattr(fla, '__version__', '?'))" || echo 'fla does not import: GDN/KDA would run the slow torch path'
case "$what" in
  py)
    # any script with this set-up (PYTHONPATH, Triton cache and its autotuning results), e.g.
    #   bash devnet/gpu.sh py benchmarks/profile_distill_step.py --out "$OUT/profile_distill_step_h200.json"
    shift
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
    # warm) for `finish`, which must be the next call
    log "call 2: preflight + distillation"
    timeout "$(( $(left) - 25 ))" python3 -m placement_search.devnet train --out results/devnet --device cuda \
      --stages corpus,supernet 2>&1 | tee "$OUT/devnet-call2.log"
    rc=${PIPESTATUS[0]}
    log "train exit $rc; packing"
    python3 -m placement_search.devnet pack --out results/devnet --dest "$OUT" --call 2
    rm -rf out/gpu/devnet && mkdir -p out/gpu && cp -r results/devnet out/gpu/devnet && ls out/gpu/devnet
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
    python3 -c "import sqlite3; c = sqlite3.connect('out/gpu/dataset/devnet.sqlite'); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()"
    tar -czf "$OUT/devnet-dataset.tgz" -C out/gpu/dataset devnet.sqlite tasks-a tasks-b $(cd out/gpu/dataset && ls speed.json placements.csv 2>/dev/null)
    ls -la "$OUT"
    exit "$rc" ;;
  dry-run)
    timeout 480 python3 -m placement_search.devnet train --dry-run --device cuda --out results/devnet 2>&1 \
      | tee "$OUT/devnet-dry-run.log"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
