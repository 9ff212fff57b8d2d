"""docs/results/distill/distill-throughput-h200.png from distill_throughput.py's JSON: tokens/s (and MFU) and peak
memory per batch size, with and without gradient checkpointing."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs/results/distill/distill-throughput-h200.json")
result = json.loads(source.read_text())
fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
for checkpointing, style in ((False, "o-"), (True, "s--")):
    rows = [r for r in result["rows"] if r["gradient_checkpointing"] == checkpointing and "tokens_per_s" in r]
    label = "gradient checkpointing" if checkpointing else "no checkpointing"
    speed.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], style, label=label)
    for r in rows:
        speed.annotate(f"{100 * r['mfu']:.0f} %", (r["batch"], r["tokens_per_s"]), textcoords="offset points", xytext=(4, 4))
    memory.plot([r["batch"] for r in rows], [r["peak_gib"] for r in rows], style, label=label)
speed.axhline(17_000, color="gray", lw=0.8, ls=":", label="40 % MFU target")
speed.set(xlabel="batch (records of ~1030 tokens)", ylabel="tokens / s", title="distill throughput (MFU annotated)")
memory.set(xlabel="batch", ylabel="peak GiB", title="peak GPU memory")
for ax in (speed, memory):
    ax.set_xscale("log", base=2)
    ax.set_xticks([4, 8, 16], ["4", "8", "16"])
    ax.legend(fontsize=8)
fig.suptitle(f"TinyLLaVA-3.1B shape, bf16, KL(all) + layer, mamba+connector; {result['device']}, {result['date']}", fontsize=9)
fig.tight_layout()
fig.savefig(source.with_suffix(".png"), dpi=110)
