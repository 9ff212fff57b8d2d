#!/usr/bin/env bash
# experiments/placement_ablation.py's rows, one process a row, all at once on one GPU:
#   bash experiments/gpu/placement_sweep.sh OUT_DIR [ROW ...]      (no rows = all of them)
# Rows write OUT_DIR/rows/row-N.json; every 20 s (and at the end) they are merged into RESULTS/sweep.json
# and the logs packed into RESULTS/logs.tar.gz (RESULTS defaults to OUT_DIR), so a run stopped at its time
# limit still returns what finished.
# Merged results belong in docs/results/placement/ (docs/placement.md).
set -euo pipefail
out=${1:?usage: placement_sweep.sh OUT_DIR [ROW ...]}; shift
results=${RESULTS:-$out}
mkdir -p "$out/rows" "$results"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 experiments/placement_ablation.py --warm >"$out/rows/warm.log" 2>&1   # the worlds and prepared data, once
i=0
start_rows() {
  for row in "$@"; do
    python3 experiments/placement_ablation.py --out "$out/rows/row-$i.json" "$row" >"$out/rows/row-$i.log" 2>&1 &
    i=$((i + 1))
  done
}
# The rows that need no scores start at once; the layer scores (seeds 0, 1, 2) are computed beside them,
# unless given, and the other rows start once they are there.
if [ $# -eq 0 ]; then mapfile -t first < <(python3 experiments/placement_ablation.py --names); else first=("$@"); fi
start_rows "${first[@]}"
if [ $# -eq 0 ] && [ ! -f docs/results/placement/placement-scores.json ]; then
  python3 experiments/placement_ablation.py --score >"$out/rows/score.log" 2>&1
  mapfile -t rest < <(python3 experiments/placement_ablation.py --names | grep -vxF -f <(printf '%s\n' "${first[@]}"))
  start_rows "${rest[@]}"
fi
cp docs/results/placement/placement-scores.json "$results/" 2>/dev/null || true
collect() {
  python3 experiments/placement_ablation.py --merge "$results/sweep.json" "$out"/rows/row-*.json >/dev/null 2>&1 || true
  tar -czf "$out/logs.tar.gz" -C "$out/rows" . 2>/dev/null && cp "$out/logs.tar.gz" "$results/" || true
}
while [ -n "$(jobs -rp)" ]; do sleep 20; collect; done
wait || true
collect
