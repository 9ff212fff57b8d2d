"""docs/results/distill/multi-gpu.png from docs/results/distill/multi-gpu.json: loss curves (1 GPU, DDP, FSDP) and per-GPU peak memory.

    python experiments/multi_gpu_plot.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).resolve().parents[1] / "docs/results/distill"
doc = json.loads((here / "multi-gpu.json").read_text())
fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
styles = {"one": ("1 GPU, batch 16", "-", "o"), "ddp": ("2 GPUs DDP, 8 each", "-", "s"),
          "fsdp": ("2 GPUs FSDP, 8 each", "--", "x"), "fsdp-resumed": ("FSDP resumed at step 20", ":", "+")}
for name, (label, line, marker) in styles.items():
    points = sorted((int(step), loss) for step, loss in doc["loss_curves"]["loss"][name].items())
    curves.plot(*zip(*points), line, marker=marker, label=label)
curves.set(xlabel="step", ylabel="distillation loss (KL + layer)", title="Embedded default, fp32: same curve")
curves.legend()
runs = doc["memory"]["runs"]
names = ["one", "ddp", "fsdp", "ddp-bf16", "fsdp-bf16"]
labels = ["1 GPU", "DDP", "FSDP", "DDP bf16", "FSDP bf16"]
heights = [runs[n]["peak_memory_gib_per_gpu"] for n in names]
bars.bar(labels, heights, color=["grey", "tab:blue", "tab:orange", "tab:blue", "tab:orange"])
for x, h in enumerate(heights):
    bars.text(x, h, f"{h:.2f}", ha="center", va="bottom")
bars.set(ylabel="peak GiB per GPU", title="1.09B-parameter teacher, global batch 8")
fig.suptitle(f"matvlm distill on {doc['card']}, {doc['date']}")
fig.tight_layout()
fig.savefig(here / "multi-gpu.png", dpi=110)
