"""Ablation of the 0.5 hybrid on the embedded default: layer choice, stepwise stages and
`trainable: converted`, each on and off, same 650 steps, same data; held-out scores into
docs/half-ablation.json.

    python docs/half_ablation.py [ROW ...]    (from the repository root; one full 650-step run a row,
                                               about 10 minutes each on 2 quiet CPU cores)

Rows already in docs/half-ablation.json are kept unless named, so rows can be run one at a time.
Every row takes recipes/tiny-default-0.5.yaml's losses, optimizer and training settings and sets its
own `stages`:
- stepwise on: layers 1, 7 for 250 steps (warmup, then constant lr), then the four layers for 400
  steps (a warmup of 20, then the recipe's decay of 200); off: the four layers for all 650 steps
  (the recipe's warmup 50, decay 200), which is exactly a run without `stages`.
- converted on: the 50 % stage trains `trainable: converted` (mixers, norms, MLPs of the converted
  layers); off: `mamba` (the mixers alone).
"""
import copy, json, sys, time
from pathlib import Path
from matvlm_cli import load_hybrid
from matvlm_cli.distill.trainer import run_distill
from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe, read_yaml, set_dotted
from matvlm_cli.world import generate_world
from matvlm_cli.world.quality import benchmark_scores

BASE = read_yaml("recipes/tiny-default-0.5.yaml")


def row(layers: list[int], stepwise: bool, converted: bool) -> dict:
    values = copy.deepcopy(BASE)
    values["student"]["layers"], values["training"]["max_steps"], values["trainable"] = None, None, "mamba"
    trainable = "converted" if converted else "mamba"
    if stepwise:
        values["stages"] = [{"layers": [1, 7], "max_steps": 250, "optimizer": {"decay_steps": 0}},
                            {"layers": layers, "max_steps": 400, "trainable": trainable, "optimizer": {"warmup_steps": 20}}]
    else:
        values["stages"] = [{"layers": layers, "max_steps": 650, "trainable": trainable}]
    return values


ROWS = {
    "layers 1,4,6,7; plain": row([1, 4, 6, 7], False, False),
    "layers 1,4,6,7; stepwise + converted": row([1, 4, 6, 7], True, True),
    "layers 1,2,4,7; plain": row([1, 2, 4, 7], False, False),
    "layers 1,2,4,7; stepwise": row([1, 2, 4, 7], True, False),
    "layers 1,2,4,7; converted": row([1, 2, 4, 7], False, True),
    "layers 1,2,4,7; stepwise + converted": row([1, 2, 4, 7], True, True),
}
if __name__ == "__main__":
    out = Path("docs/half-ablation.json")
    results = json.loads(out.read_text()) if out.exists() else {}
    wanted = sys.argv[1:] or [name for name in ROWS if name not in results]
    world = Path("runs/ablation-world")
    if not (world / "pope").is_dir():
        world = generate_world(world, seed=0, train_size=1, overwrite=True).root  # the held-out sets
    for name in wanted:
        values = ROWS[name]
        for key, value in {"output.dir": f"runs/half-ablation/{list(ROWS).index(name)}", "output.overwrite": True,
                           "output.save_every": 0}.items():
            set_dotted(values, key, value)
        recipe = build_recipe(DistillRecipe, values)
        check_distill_recipe(recipe)
        t = time.time()
        final = run_distill(recipe)
        seconds = round(time.time() - t)
        scores = benchmark_scores(load_hybrid(final), final, world)
        results[name] = {k: round(v, 4) for k, v in scores.items()} | {"train_seconds": seconds}
        print(name, json.dumps(results[name]), flush=True)
        out.write_text(json.dumps(results, indent=1))
