"""docs/results/distill/distill-shapes-h200.png from distill_shapes.py's JSON: tokens/s of each step of each
`matvlm distill` run, with steps 10-60 shaded and each run's MFU over them."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs/results/distill/distill-shapes-h200.json")
result = json.loads(source.read_text())
fig, ax = plt.subplots(figsize=(9, 4.5))
for row in result["runs"]:
    if len(row.get("steps", [])) < 2:
        continue
    steps = row["steps"]
    # Each log line holds the tokens so far and tokens/s since the first step: their ratio is the time so far.
    elapsed = [s["tokens"] / s["tokens_per_s"] for s in steps]
    per_step = [(b["tokens"] - a["tokens"]) / (tb - ta) for a, b, ta, tb in zip(steps, steps[1:], elapsed, elapsed[1:])]
    window = (row.get("summary") or {}).get("throughput", {}).get("steps_10_60") or {}
    label = (f"{row['run']}: {window.get('tokens_per_s', 0) / 1e3:.1f}k tok/s, MFU {100 * window.get('mfu', 0):.1f} % "
             f"(vs 788 TFLOP/s: {100 * window.get('mfu_vs_788', 0):.1f} %), padding {100 * (window.get('padding') or 0):.1f} %")
    ax.plot([s["step"] for s in steps[1:]], per_step, lw=1.2, label=label)
ax.axvspan(10, 60, color="gray", alpha=0.12, label="steps 10-60")
ax.set(xlabel="step", ylabel="tokens / s (that step)", title="matvlm distill on the LLaVA-mix-shaped set, TinyLLaVA-3.2B shape, bf16, compiled")
ax.set_ylim(bottom=0)
ax.legend(fontsize=7, loc="lower right")
fig.suptitle(f"{result['device']}, {result['date']}, torch {result['torch']}, transformers {result['transformers']}", fontsize=8)
fig.tight_layout()
out = source.with_suffix(".png")
fig.savefig(out, dpi=120)
print(out)
