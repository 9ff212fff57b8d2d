"""docs/results/distill/warmup-h200.png: the time from the start of the first step to each step of
`matvlm distill` (distill_shapes.py's JSON), before the autotune shortlists and with them."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "docs/results/distill"
RUNS = [("distill-shapes-h200.json", "full autotune, run 2", "tab:red"),
        ("distill-shapes-h200-run3.json", "full autotune, run 3", "tab:orange"),
        ("distill-shapes-h200-shortlist-1.json", "shortlists, run 1", "tab:blue"),
        ("distill-shapes-h200-shortlist-2.json", "shortlists, run 2", "tab:cyan")]

fig, ax = plt.subplots(figsize=(9, 4.5))
for name, label, color in RUNS:
    row = json.loads((RESULTS / name).read_text())["runs"][0]
    steps = row["steps"]
    # Each log line holds the tokens so far and tokens/s since the first step began: their ratio is the time so far.
    elapsed = [s["tokens"] / s["tokens_per_s"] for s in steps]
    warmup = row["summary"]["throughput"]["steps_10_60"]["warmup_s"]
    ax.plot([s["step"] for s in steps], elapsed, color=color, label=f"{label}: warm-up {warmup:.0f} s")
ax.set_xlabel("step")
ax.set_ylabel("seconds since the first step began")  # step 1's height is its own time: compiling and autotuning
ax.set_title("matvlm distill, TinyLLaVA-3.2B shape, packed 4 x 8192, one H200 (2026-12-04)")
ax.legend(loc="lower right")
ax.grid(alpha=0.3)
fig.tight_layout()
out = sys.argv[1] if len(sys.argv) > 1 else RESULTS / "warmup-h200.png"
fig.savefig(out, dpi=120)
print(out)
