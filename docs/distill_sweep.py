"""Distillation settings on the embedded default (ratio 0.25), scored on the held-out sets.

    python docs/distill_sweep.py [OUT.json]   (from the repository root; a GPU makes it minutes)

Each variant is recipes/tiny-default.yaml with a few keys changed. Used to choose that recipe's
settings; the results are in docs/distill-sweep.json.
"""
import json
import sys
import time
from pathlib import Path

import torch

from matvlm_cli import load_hybrid
from matvlm_cli.distill.trainer import run_distill
from matvlm_cli.recipes import DistillRecipe, build_recipe, read_yaml, set_dotted
from matvlm_cli.world import generate_world
from matvlm_cli.world.quality import benchmark_scores

VARIANTS = {
    "tiny-default": {},
    "kl on response only": {"losses.kl_positions": "response"},
    "mamba+connector": {"trainable": "mamba+connector"},
    "lr 2e-3": {"optimizer.lr": 2.0e-3},
    "+ ce 0.5": {"losses.ce_weight": 0.5},
    "layer weight 0.3": {"losses.layer_weight": 0.3},
    "batch 16, 400 steps": {"training.batch_size": 16, "training.max_steps": 400, "optimizer.decay_steps": 120},
    "1400 steps": {"training.max_steps": 1400, "optimizer.decay_steps": 400},
}
device = "cuda" if torch.cuda.is_available() else "cpu"
world = generate_world(Path("runs/sweep-world"), seed=0, train_size=1, overwrite=True).root  # held-out sets only
results = {}
for name, overrides in VARIANTS.items():
    values = read_yaml("recipes/tiny-default.yaml")
    slug = "".join(c for c in name if c.isalnum())
    for key, value in {**overrides, "output.dir": f"runs/sweep/{slug}", "output.overwrite": True, "output.save_every": 0}.items():
        set_dotted(values, key, value)
    started = time.time()
    final = run_distill(build_recipe(DistillRecipe, values))
    seconds = time.time() - started
    scores = benchmark_scores(load_hybrid(final).to(device), final, world)
    results[name] = {"overrides": overrides, "seconds": round(seconds), **scores}
    print(name, json.dumps(results[name]), flush=True)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/distill-sweep.json")
out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "results": results}, indent=1))
