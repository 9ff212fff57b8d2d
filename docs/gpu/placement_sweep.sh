#!/usr/bin/env bash
# docs/placement_ablation.py's rows, one process a row, all at once on one GPU:
#   bash docs/gpu/placement_sweep.sh OUT_DIR [ROW ...]      (no rows = all of them)
# Rows write OUT_DIR/rows/row-N.json; every 20 s (and at the end) they are merged into RESULTS/sweep.json
# and the logs packed into RESULTS/logs.tar.gz (RESULTS defaults to OUT_DIR), so a run stopped at its time
# limit still returns what finished.
set -euo pipefail
out=${1:?usage: placement_sweep.sh OUT_DIR [ROW ...]}; shift
results=${RESULTS:-$out}
mkdir -p "$out/rows" "$results"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The layer scores (seeds 0, 1, 2) first, unless given: the scored rows convert the layers they pick.
[ -f docs/placement-scores.json ] || python3 docs/placement_ablation.py --score >"$out/rows/score.log" 2>&1
cp docs/placement-scores.json "$results/"
python3 docs/placement_ablation.py --warm >"$out/rows/warm.log" 2>&1
if [ $# -eq 0 ]; then mapfile -t rows < <(python3 docs/placement_ablation.py --names); else rows=("$@"); fi
collect() {
  python3 docs/placement_ablation.py --merge "$results/sweep.json" "$out"/rows/row-*.json >/dev/null 2>&1 || true
  tar -czf "$out/logs.tar.gz" -C "$out/rows" . 2>/dev/null && cp "$out/logs.tar.gz" "$results/" || true
}
i=0; pids=()
for row in "${rows[@]}"; do
  python3 docs/placement_ablation.py --out "$out/rows/row-$i.json" "$row" >"$out/rows/row-$i.log" 2>&1 &
  pids+=($!); i=$((i + 1))
done
while [ -n "$(jobs -rp)" ]; do sleep 20; collect; done
wait || true
collect
