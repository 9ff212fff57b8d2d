"""Loss ablation (MaTVLM's L = a*L_prob + b*L_layer + c*L_ce) on the embedded default: 200 steps each, held-out scores.

    python experiments/loss_ablation.py     (from the repository root; about 12 minutes on 2 CPU cores)

Writes docs/results/distill/loss-ablation.json (the table in docs/distill.md).
"""
import json
import time
from pathlib import Path

from matvlm_cli import load_hybrid
from matvlm_cli.distill.trainer import run_distill
from matvlm_cli.evaluate.quality import benchmark_scores
from matvlm_cli.recipes import DistillRecipe, build_recipe, read_yaml, set_dotted
from matvlm_cli.world import generate_world

WORLD = generate_world(Path("runs/ablation-world"), seed=0, train_size=1, overwrite=True).root  # held-out sets
settings = {"ce only": (0, 0, 1), "layer only": (0, 1, 0), "prob only": (1, 0, 0), "prob + layer": (1, 1, 0), "prob + layer + ce": (1, 1, 1)}
results = {}
for name, (kl, layer, ce) in settings.items():
    values = read_yaml("recipes/tiny-default.yaml")
    for key, value in {"losses.kl_weight": kl, "losses.layer_weight": layer, "losses.ce_weight": ce, "training.max_steps": 200,
                       "optimizer.decay_steps": 60, "output.dir": f"runs/ablation/{name.replace(' ', '')}", "output.overwrite": True,
                       "output.save_every": 0}.items():
        set_dotted(values, key, value)
    t = time.time()
    final = run_distill(build_recipe(DistillRecipe, values))
    scores = benchmark_scores(load_hybrid(final), final, WORLD)
    results[name] = scores | {"seconds": round(time.time() - t)}
    print(name, json.dumps(results[name]), flush=True)
Path("docs/results/distill/loss-ablation.json").write_text(json.dumps(results, indent=1))
