#!/usr/bin/env bash
# Programmatic dependent launch (kernels.pdl) on one H200, in one call:
#   bash experiments/gpu/pdl_ab.sh          (from the repository root, .kernels/ beside it; results in $OUT)
# CHECKS=1: the GPU checks of the decode kernels; PROBE=1: experiments/gpu/pdl_gemv.py; then `matvlm bench` for
# the teacher and the 0.5 hybrid at $SEQ once per entry of RUNS, each "MATVLM_PDL:EARLY_LAUNCH:PREFETCH"
# (the GEMV's PDL_MODE for that run, set before the CLI starts).
set -uo pipefail
export PYTHONUNBUFFERED=1 COLUMNS=160
OUT=${OUT:-/tmp/pdl-ab}; mkdir -p "$OUT"
SEQ=${SEQ:-8192}
KERNELS=fla bash .kernels/build-on-gpu.sh >/dev/null || { echo "fla install failed"; exit 1; }
export PYTHONPATH=/tmp/kern/site:$PWD
python3 -c "import torch, transformers, triton, torch._inductor.config as c; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'inductor enable_pdl', hasattr(c.triton, 'enable_pdl'))" | tee "$OUT/gpu.txt"
[ "${CHECKS:-1}" = 1 ] && timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
  -k "split_kv or graph_engine_decodes_like_generate_on_cuda or fused_decode_step or gemv" 2>&1 | tail -5 | tee -a "$OUT/gpu.txt"
[ "${PROBE:-0}" = 1 ] && timeout 200 python3 experiments/gpu/pdl_gemv.py 2>&1 | tee "$OUT/pdl-gemv.txt"
for run in ${RUNS:-0:0:0 1:0:0}; do
  IFS=: read -r pdl early prefetch <<<"$run"
  name="pdl$pdl-early$early-prefetch$prefetch"
  MATVLM_PDL=$pdl timeout 240 python3 -c "
import sys
from matvlm_cli.kernels import gemv
gemv.PDL_MODE.update(EARLY_LAUNCH=bool($early), PREFETCH=bool($prefetch))
from matvlm_cli.cli import app
sys.argv[0] = 'matvlm'
app()" bench --ratio 0.5 --seq-len $SEQ --engine graphs --repeats 2 $([ -n "${PROFILE:-}" ] && echo --profile) \
    --output "$OUT/bench-$name" 2>&1 | grep -v -e "Loading weights" -e "requires torchvision" | tee "$OUT/bench-$name-log.txt" | grep -e "│ teacher" -e "│ hybrid" -e "decode step"
done
