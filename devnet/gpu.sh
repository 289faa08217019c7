#!/usr/bin/env bash
# The dev supernet's GPU calls (see devnet/README.md). Run from the repo root on the device machine:
#   bash devnet/gpu.sh call1     # preflight + teacher (4 min budget)          -> $OUT/devnet-call1.*
#   bash devnet/gpu.sh call2     # distillation (5 min) + evidence + stability -> $OUT/devnet-call2.*
#   bash devnet/gpu.sh dry-run   # the dry run on the GPU (real kernels, tiny batches), ~2-3 min
# Needs `.whl` carried (fla_core-0.6.0 wheel). Each training command is wrapped in `timeout` so the call
# ends (and packs what exists) before the device's 10-minute limit even if a stage overran its budget.
set -uo pipefail
what=${1:?call1, call2 or dry-run}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fla_core-0.6.0-*.whl || exit 3
# the repo's layout installs kernels/, evaluators/, surrogate/, devnet/ under placement_search: mirror it without a build
rm -rf /tmp/ps && mkdir -p /tmp/ps/placement_search && cp -r placement_search/. /tmp/ps/placement_search/ || exit 3
for d in kernels evaluators surrogate devnet; do ln -s "$PWD/$d" "/tmp/ps/placement_search/$d"; done
export PYTHONPATH=/tmp/ps:/tmp/site
OUT=${OUT:?OUT is set on the device machine}
log() { echo "[$(date +%T)] $*"; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', getattr(fla, '__version__', '?'))" || echo 'fla does not import: GDN/KDA would run the slow torch path'
case "$what" in
  call1)
    log "call 1: corpus check + preflight + teacher"
    timeout 470 python3 -m placement_search.devnet train --out results/devnet --device cuda \
      --stages corpus,teacher 2>&1 | tee "$OUT/devnet-call1.log"
    rc=${PIPESTATUS[0]}
    log "train exit $rc; packing"
    python3 -m placement_search.devnet pack --out results/devnet --dest "$OUT" --call 1
    exit "$rc" ;;
  call2)
    log "call 2: distillation + evidence + stability"
    timeout 480 python3 -m placement_search.devnet train --out results/devnet --device cuda \
      --stages corpus,supernet,evidence,stability 2>&1 | tee "$OUT/devnet-call2.log"
    rc=${PIPESTATUS[0]}
    log "train exit $rc; packing"
    python3 -m placement_search.devnet pack --out results/devnet --dest "$OUT" --call 2
    exit "$rc" ;;
  dry-run)
    timeout 480 python3 -m placement_search.devnet train --dry-run --device cuda --out results/devnet 2>&1 \
      | tee "$OUT/devnet-dry-run.log"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
