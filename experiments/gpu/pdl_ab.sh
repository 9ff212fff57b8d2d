#!/usr/bin/env bash
# Programmatic dependent launch (kernels.pdl) on one H200: the GPU checks of the decode kernels with it on,
# then `matvlm bench` for the teacher and the 0.5 hybrid at 8k, with PDL off and on, in one call.
#   bash experiments/gpu/pdl_ab.sh          (from the repository root, .kernels/ beside it; results in $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 COLUMNS=160
OUT=${OUT:-/tmp/pdl-ab}; mkdir -p "$OUT"
SEQ=${SEQ:-8192}
KERNELS=fla bash .kernels/build-on-gpu.sh >/dev/null || { echo "fla install failed"; exit 1; }
export PYTHONPATH=/tmp/kern/site:$PWD
python3 -c "import torch, transformers, triton, torch._inductor.config as c; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'inductor enable_pdl', hasattr(c.triton, 'enable_pdl'))" | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_triton_kernels.py \
  -k "split_kv or graph_engine_decodes_like_generate_on_cuda or fused_decode_step or gemv or fused_phi or fused_gemma or normalises or cache_write or batch_1" 2>&1 | tail -5 | tee -a "$OUT/gpu.txt"
for pdl in ${PDL_RUNS:-0 1}; do
  MATVLM_PDL=$pdl timeout 240 python3 -m matvlm_cli bench --ratio 0.5 --seq-len $SEQ --engine graphs --repeats 2 \
    $([ "$pdl" = 1 ] && echo --profile) --output "$OUT/bench-pdl$pdl" 2>&1 | grep -v -e "Loading weights" -e "requires torchvision" \
    | tee "$OUT/bench-pdl$pdl-log.txt" | tail -12
done
