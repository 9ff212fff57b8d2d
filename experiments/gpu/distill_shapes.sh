#!/usr/bin/env bash
# Issue 25's GPU measurement, in one call on an H200 (about 6 minutes expected, not yet timed; no CUDA build):
#   with fla-core's wheel and mamba_ssm's sdist downloaded into .kernels/ beforehand (no network there), from the repository root:
#   OUT=/tmp/out bash experiments/gpu/distill_shapes.sh .kernels   (writes $OUT; the JSON belongs in docs/results/distill/distill-shapes-h200.json)
# fla's wheel is installed and mamba_ssm's sdist unpacked (its Triton kernels load without the CUDA build,
# kernels/__init__.py); then `matvlm distill` on the mix (experiments/gpu/distill_shapes.py), then the GPU checks of
# the packed kernels. Every output line reaches $OUT as it is printed (a pipe's buffer lost at a timeout
# is how the first try came back empty).
set -uo pipefail
kernels=${1:-.kernels}
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$kernels"/fla_core-*.whl || exit 1
tar xzf "$kernels"/mamba_ssm-*.tar.gz -C /tmp || exit 1
export PYTHONPATH=$PWD:/tmp/site:$(ls -d /tmp/mamba_ssm-*/) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
timeout "${DISTILL_SECONDS:-430}" python3 experiments/gpu/distill_shapes.py --runs ${RUNS:-packed:4x8192} --steps 61 --records 6000 \
  --timeout 400 --budget 410 --output "$OUT/distill-shapes-h200.json" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/distill-shapes.log"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k packed > "$OUT/kernel-tests.txt" 2>&1; echo "kernel tests rc=$?" >> "$OUT/kernel-tests.txt"; tail -15 "$OUT/kernel-tests.txt"
