#!/usr/bin/env bash
# The residual fold (matvlm_cli/bench/residual_fold.py) timed against the same build without it, in one call, so
# the comparison holds whichever card the call gets: `matvlm bench` for the teacher and the 0.5 hybrid at 8k, the
# fold off (experiments/gpu/bench_without_residual_fold.py), then on (the CLI as users run it, with --profile:
# the profile should show no triton_poi_fused_add_* kernels a layer).
#   bash experiments/gpu/fold_ab.sh     (from the repository root, .kernels/ beside it; results in $OUT)
# About 5 minutes on an H200 (each model's step compiles twice, about 45 s a time). SEQ=32768 for the long context.
set -uo pipefail
export PYTHONUNBUFFERED=1 COLUMNS=160
OUT=${OUT:-/tmp/fold-ab}; mkdir -p "$OUT"
SEQ=${SEQ:-8192}
KERNELS=fla bash .kernels/build-on-gpu.sh >/dev/null || { echo "fla install failed"; exit 1; }
export PYTHONPATH=/tmp/kern/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
options="--ratio 0.5 --seq-len $SEQ --engine graphs --repeats 2"
timeout 270 python3 experiments/gpu/bench_without_residual_fold.py $options --output "$OUT/bench-unfolded" 2>&1 \
  | grep -v -e "Loading weights" -e "requires torchvision" | tee "$OUT/bench-unfolded-log.txt" | tail -12
timeout 270 python3 -m matvlm_cli bench $options --profile --output "$OUT/bench-folded" 2>&1 \
  | grep -v -e "Loading weights" -e "requires torchvision" | tee "$OUT/bench-folded-log.txt" | tail -12
grep -h "fused_add" "$OUT"/bench-folded/profile-*.txt | head -5 || true
