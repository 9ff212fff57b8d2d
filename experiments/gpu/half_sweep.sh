#!/usr/bin/env bash
# The 0.5 hybrid's ablation rows (experiments/half_ablation.py), one process a row, all on one GPU at once:
#   bash experiments/gpu/half_sweep.sh OUT_DIR [ROW ...]      (no rows = all of them)
# Each row writes OUT_DIR/row-N.json; python experiments/half_ablation.py --merge INTO OUT_DIR/row-*.json joins them.
# The committed merge is docs/results/distill/half-sweep-h200.json (docs/distill.md, the 0.5 ablation).
set -euo pipefail
out=${1:?usage: half_sweep.sh OUT_DIR [ROW ...]}; shift
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 experiments/half_ablation.py --warm >"$out/warm.log" 2>&1   # world + prepared data once, not raced by the rows
if [ $# -eq 0 ]; then mapfile -t rows < <(python3 experiments/half_ablation.py --names); else rows=("$@"); fi
i=0
for row in "${rows[@]}"; do  # all at once: each row is a few hundred MiB of GPU memory and mostly launch-bound
  python3 experiments/half_ablation.py --out "$out/row-$i.json" "$row" >"$out/row-$i.log" 2>&1 &
  i=$((i + 1))
done
wait
