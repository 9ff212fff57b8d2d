"""How much the embedded teacher leans on each attention layer: convert the given layers (no training)
and score the hybrid on the held-out sets with `evaluate.quality.benchmark_scores`.

    python experiments/layer_probe.py 0 1 2 3 4 5 6 7 1,7 2,6     (from the repository root; ~10 s a model on 2 CPU cores)

It prints one line a model; the output of that command, 2026-11-26, is in docs/results/placement/layer-probe.txt.
"""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from matvlm_cli.evaluate.quality import benchmark_scores
from matvlm_cli.hybrid import convert_to_hybrid
from matvlm_cli.paths import default_teacher_dir
from matvlm_cli.world import generate_world

world = generate_world(Path("runs/probe-world"), seed=0, train_size=1, overwrite=True).root  # held-out sets
for spec in sys.argv[1:]:
    model = AutoModelForImageTextToText.from_pretrained(default_teacher_dir()).eval()
    convert_to_hybrid(model, [int(layer) for layer in spec.split(",")], seed=0)
    with torch.no_grad():
        scores = benchmark_scores(model, default_teacher_dir(), world)
    print(f"layers {spec}:", {name: round(value, 3) for name, value in scores.items()}, flush=True)
