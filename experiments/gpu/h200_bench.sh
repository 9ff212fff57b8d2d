#!/usr/bin/env bash
# Issue 26 on one H200: the GPU checks of what changed, the prefill probe, then `matvlm bench`
# (decode rows, the decode-step profile, the throughput search). Run from the repository root with
# .kernels/ (fla-core's wheel and build-on-gpu.sh, downloaded beforehand: the GPU machine has no network) beside it.
# Every stage has a deadline, and the probe and the bench rewrite their reports after each model, so a
# stage cut short keeps what it finished. Results go to $OUT; the committed ones are in docs/results/bench/ (docs/bench.md).
# All three stages take about 15 minutes on an H200 (the bench compiles each model's step twice, about
# 45 s a time), more than one 10-minute call: STAGES=checks,probe for one call, STAGES=bench for another.
set -uo pipefail
export PYTHONUNBUFFERED=1 COLUMNS=160  # rich tables at full width in the log
OUT=${OUT:-/tmp/h200-bench}; mkdir -p "$OUT"
BUDGET=${BUDGET:-560}  # seconds for the whole script
STAGES=${STAGES:-checks,probe,bench}  # also, not in the default: combine (experiments/gpu/decode_combine.py),
# prefetch (experiments/gpu/gemv_prefetch.py), gemv (experiments/gpu/gemv_probe.py: the GEMV's tiles with and
# without a pipelined loop, about 3 minutes), fold (below: the residual fold off, then on, about 5 minutes)
# tiles (below: `matvlm bench` with the GEMV tiles before session 21's, about 4 minutes)
# THROUGHPUT="" leaves the throughput searches out of the bench stage; SEQ_LENS="8192" times 8k alone
has() { [[ ",$STAGES," == *",$1,"* ]]; }
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

KERNELS=fla bash .kernels/build-on-gpu.sh >/dev/null || { echo "fla install failed"; exit 1; }
# Inductor's and Triton's caches in one place, saved to $OUT at the end (compile-cache.tgz.*, 15 MB parts). A
# fresh machine has neither; copied into .compile-cache/ and carried (`carry: [".kernels", ".compile-cache"]`),
# the next call on the same card and software skips most of the compiling, about 45 s a model's step a time.
# A changed module of matvlm_cli/kernels changes the step's cache key (bench/residual_fold.py), so it recompiles.
export TORCHINDUCTOR_CACHE_DIR=/tmp/compile-cache/inductor TRITON_CACHE_DIR=/tmp/compile-cache/triton
if [ ! -d /tmp/compile-cache ] && ls .compile-cache/compile-cache.tgz.* >/dev/null 2>&1; then
  cat .compile-cache/compile-cache.tgz.* | tar xzf - -C /tmp && echo "compile cache: $(du -sh /tmp/compile-cache | cut -f1) restored"
fi
save_compile_cache() {
  rm -f "$OUT"/compile-cache.tgz.*
  tar czf - -C /tmp compile-cache | split -b 15m - "$OUT/compile-cache.tgz."
  # at most 8 files come back: keep the cache only where it fits in 4 parts
  [ "$(ls "$OUT"/compile-cache.tgz.* | wc -l)" -le 4 ] || { echo "compile cache too large to keep"; rm -f "$OUT"/compile-cache.tgz.*; }
}
export PYTHONPATH=/tmp/kern/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# the checks take about 5 minutes (session 18): 200 s with the bench or the fold A/B in the same call, the
# call's budget less 2 minutes with the combine or prefetch experiment, else all of it
checks_limit=$(if has bench || has fold; then echo 200; elif has combine || has prefetch; then echo $(( $(left) - 120 )); else echo $(( $(left) - 10 )); fi)
has checks && timeout $checks_limit python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton_kernels.py \
  -k "prefill_chunk or skip_gate_norm or split_kv or graph_engine_decodes_like_generate_on_cuda or mixer_prefill or fused_decode_step or gemv or fused_phi or fused_gemma or normalises or cache_write or batch_1 or residual or compiled_step" \
  2>&1 | tail -15 | tee -a "$OUT/gpu.txt"
echo "checks done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

# the GEMV probe first, the likeliest gain (session 20), keeping 2 minutes for the combine and prefetch experiments
gemv_limit=$(if has combine || has prefetch; then echo $(( $(left) - 130 )); else echo $(( $(left) - 10 )); fi)
has gemv && timeout $gemv_limit python3 experiments/gpu/gemv_probe.py 2>&1 | tee "$OUT/gemv-probe-h200-stages.txt"
echo "gemv done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
has combine && timeout $(( $(left) - 10 )) python3 experiments/gpu/decode_combine.py 2>&1 | tee "$OUT/decode-combine-h200.txt"
echo "combine done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
has prefetch && timeout $(( $(left) - 10 )) python3 experiments/gpu/gemv_prefetch.py 2>&1 | tee "$OUT/gemv-prefetch-h200.txt"
echo "prefetch done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

# The residual fold (matvlm_cli/bench/residual_fold.py) against the same build without it, in one call, so the
# comparison holds whichever card the call gets: `matvlm bench` for the teacher and the 0.5 hybrid at 8k, the
# fold off (bench_without_residual_fold.py), then on (the CLI as users run it, with --profile: no
# triton_poi_fused_add_* kernels a layer should be left). Each model's step compiles twice, about 45 s a time.
if has fold; then
  options="--ratio 0.5 --seq-len 8192 --engine graphs --repeats 2"
  timeout $(( $(left) / 2 - 5 )) python3 experiments/gpu/bench_without_residual_fold.py $options --output "$OUT/bench-unfolded" 2>&1 \
    | grep -v -e "Loading weights" -e "requires torchvision" | tee "$OUT/bench-unfolded-log.txt" | tail -12
  timeout $(( $(left) - 10 )) python3 -m matvlm_cli bench $options --profile --output "$OUT/bench-folded" 2>&1 \
    | grep -v -e "Loading weights" -e "requires torchvision" | tee "$OUT/bench-folded-log.txt" | tail -12
  grep -h "fused_add" "$OUT"/bench-folded/profile-*.txt | head -5 || true
fi
echo "fold done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

# Session 21's GEMV tiles against the ones before (experiments/gpu/bench_with_session20_tiles.py): `matvlm bench`
# for the teacher and the 0.5 hybrid at 8k with the old tiles, in half the time left; the bench stage after it is the
# new tiles' half, and the prefetch stage's chain times both tiles too
has tiles && timeout $(( $(left) / 2 )) python3 experiments/gpu/bench_with_session20_tiles.py --ratio 0.5 --seq-len 8192 \
  --engine graphs --repeats 2 --output "$OUT/bench-session20-tiles" 2>&1 | grep -v -e "Loading weights" -e "requires torchvision" \
  | tee "$OUT/bench-session20-tiles-log.txt" | tail -12
echo "tiles done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

has probe && timeout 300 python3 experiments/gpu/prefill_probe.py --output "$OUT/prefill-h200.json" 2>&1 \
  | grep -v -e "Loading weights" -e "requires torchvision" | tee "$OUT/prefill-h200.txt"
echo "probe done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

seq_lens=$(for n in ${SEQ_LENS-8192 32768}; do echo -n " --seq-len $n"; done)
has bench && timeout $(( $(left) - 8 )) python3 -m matvlm_cli bench --ratio 0.5 --ratio 0.25 $seq_lens \
  --engine graphs --repeats 2 ${THROUGHPUT---throughput 8192 --throughput 32768 --throughput 4194304} --profile \
  --output "$OUT/bench" 2>&1 | grep -v -e "Loading weights" -e "requires torchvision" | tee "$OUT/bench-log.txt"
echo "bench done at $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
save_compile_cache
[ -d "$OUT/bench" ] && tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
ls -la "$OUT"
