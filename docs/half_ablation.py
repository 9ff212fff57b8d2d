"""Ablation of the 0.5 hybrid on the embedded default: each ingredient on and off, same data; held-out
scores into a JSON file (docs/half-ablation.json by default).

    python docs/half_ablation.py [--out FILE] [ROW ...]   (from the repository root; one full run a row,
                                                          about 10 minutes each on 2 quiet CPU cores)
    python docs/half_ablation.py --list                   (the rows and their settings)

Rows already in the output file are kept unless named, so rows can be run one at a time, or in
parallel processes each with its own --out (docs/gpu/half_sweep.sh does that on one GPU).
Every row is recipes/tiny-default-0.5.yaml with the common ground below (BASE) and the row's dotted
overrides (as `--set` takes them); "layers 1,3,4,7; converted + KL all" is the committed recipe.
Stepwise rows set `stages`: layers 1, 7 for 250 steps (warmup, then constant lr), then the row's
layers for the remaining steps (a warmup of 20, then the recipe's decay).
"""
import copy, json, sys, time
from pathlib import Path
from matvlm_cli import load_hybrid
from matvlm_cli.distill.trainer import run_distill
from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe, read_yaml, set_dotted
from matvlm_cli.world import generate_world
from matvlm_cli.world.quality import benchmark_scores

# The rows' common ground: the recipe's file with its first 0.5 settings (layers 1, 2, 4, 7, KL on the
# answers, the mixers alone trained), so that each row names everything it changes.
BASE = read_yaml("recipes/tiny-default-0.5.yaml")
for key, value in {"student.layers": [1, 2, 4, 7], "losses.kl_positions": "response", "trainable": "mamba"}.items():
    set_dotted(BASE, key, value)


def stepwise(layers: list[int], steps: int, trainable: str = "mamba") -> dict:
    return {"student.layers": None, "training.max_steps": None, "stages": [
        {"layers": [1, 7], "max_steps": 250, "optimizer": {"decay_steps": 0}},
        {"layers": layers, "max_steps": steps - 250, "trainable": trainable, "optimizer": {"warmup_steps": 20}}]}


# The embedded teacher's held-out scores (README, Distill), for the recovery column of --table.
TEACHER = {"pope_adversarial_accuracy": 0.93, "pope_popular_accuracy": 0.95, "pope_random_accuracy": 0.96,
           "mmmu_accuracy": 0.947, "textvqa_accuracy": 1.0}


# name -> overrides of the base recipe. The first rows are the ones the README's table names.
ROWS = {
    "layers 1,4,6,7; plain": {"student.layers": [1, 4, 6, 7]},
    "layers 1,4,6,7; stepwise + converted": stepwise([1, 4, 6, 7], 650, "converted"),
    "layers 1,2,4,7; plain": {},
    "layers 1,2,4,7; stepwise": stepwise([1, 2, 4, 7], 650),
    "layers 1,2,4,7; converted": {"trainable": "converted"},
    "layers 1,2,4,7; stepwise + converted": stepwise([1, 2, 4, 7], 650, "converted"),
    "layers 1,2,3,7": {"student.layers": [1, 2, 3, 7]},
    "layers 1,3,4,7": {"student.layers": [1, 3, 4, 7]},
    "layers 1,2,6,7": {"student.layers": [1, 2, 6, 7]},
    "layers 1,2,4,7; 1000 steps": {"training.max_steps": 1000},
    "layers 1,2,4,7; 1400 steps": {"training.max_steps": 1400, "optimizer.decay_steps": 400},
    "layers 1,2,4,7; lr 4e-3": {"optimizer.lr": 4.0e-3},
    "layers 1,2,4,7; lr 1e-3": {"optimizer.lr": 1.0e-3},
    "layers 1,2,4,7; KL on all positions": {"losses.kl_positions": "all"},
    "layers 1,2,4,7; no CE": {"losses.ce_weight": 0.0},
    "layers 1,2,4,7; CE 2": {"losses.ce_weight": 2.0},
    "layers 1,2,4,7; layer loss 0.1": {"losses.layer_weight": 0.1},
    "layers 1,2,4,7; layer loss 0": {"losses.layer_weight": 0.0},
    "layers 1,2,4,7; KL temperature 2": {"losses.kl_temperature": 2.0},
    "layers 1,2,4,7; batch 16": {"training.batch_size": 16},
    "layers 1,2,4,7; decay 400": {"optimizer.decay_steps": 400},
    "layers 1,2,4,7; trainable all": {"trainable": "all"},
    "layers 1,2,4,7; seed 1": {"training.seed": 1},
    "layers 1,2,4,7; seed 2": {"training.seed": 2},
    "layers 1,3,4,7; seed 1": {"student.layers": [1, 3, 4, 7], "training.seed": 1},
    "layers 1,3,4,7; converted": {"student.layers": [1, 3, 4, 7], "trainable": "converted"},
    "layers 1,3,4,7; KL on all positions": {"student.layers": [1, 3, 4, 7], "losses.kl_positions": "all"},
    "layers 1,3,4,7; converted + KL all": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all"},
    "layers 1,3,4,7; 1000 steps": {"student.layers": [1, 3, 4, 7], "training.max_steps": 1000},
    "layers 1,3,4,7; batch 16": {"student.layers": [1, 3, 4, 7], "training.batch_size": 16},
    "layers 1,3,4,7; converted + KL all; 1000 steps": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all", "training.max_steps": 1000},
    "layers 1,3,4,7; converted + KL all; 1000 steps; seed 1": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all", "training.max_steps": 1000, "training.seed": 1},
    "layers 1,3,4,7; converted + KL all; batch 16": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all", "training.batch_size": 16},
    "layers 1,2,4,7; converted + KL all": {"trainable": "converted", "losses.kl_positions": "all"},
    "layers 1,2,4,7; converted + KL all; 1000 steps": {"trainable": "converted", "losses.kl_positions": "all", "training.max_steps": 1000},
    "layers 1,3,5,7": {"student.layers": [1, 3, 5, 7]},
    "layers 1,3,4,7; KL on all positions; seed 1": {"student.layers": [1, 3, 4, 7], "losses.kl_positions": "all", "training.seed": 1},
    "layers 1,3,4,7; KL on all positions; seed 2": {"student.layers": [1, 3, 4, 7], "losses.kl_positions": "all", "training.seed": 2},
    "layers 1,3,4,7; converted + KL all; seed 1": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all", "training.seed": 1},
    "layers 1,3,4,7; converted + KL all; seed 2": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all", "training.seed": 2},
    "layers 1,3,4,7; converted + KL all; 800 steps": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all", "training.max_steps": 800},
    "layers 1,3,4,7; KL on all positions; 1000 steps": {"student.layers": [1, 3, 4, 7], "losses.kl_positions": "all", "training.max_steps": 1000},
    "layers 1,3,4,7; converted + KL all; CE 1": {"student.layers": [1, 3, 4, 7], "trainable": "converted", "losses.kl_positions": "all", "losses.ce_weight": 1.0},
}


def recipe_of(name: str, extra: dict) -> DistillRecipe:
    values = copy.deepcopy(BASE)
    for key, value in {**ROWS[name], **extra}.items():
        set_dotted(values, key, copy.deepcopy(value))
    recipe = build_recipe(DistillRecipe, values)
    check_distill_recipe(recipe)
    return recipe


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--list" in args or "--names" in args:
        for name, overrides in ROWS.items():
            print(name if "--names" in args else f"{name}: {json.dumps(overrides)}")
        sys.exit(0)
    if "--table" in args:  # --table FILE: a markdown table of a results file, with the worst recovery of each row
        keys = ["pope_adversarial_accuracy", "pope_popular_accuracy", "pope_random_accuracy", "mmmu_accuracy", "textvqa_accuracy"]
        results = json.loads(Path(args[args.index("--table") + 1]).read_text())
        print("| row | POPE adv. / pop. / rand. | MMMU-style | TextVQA-style | lowest recovery |\n| --- | --- | --- | --- | --- |")
        for name, r in results.items():
            if not name.startswith("_"):
                low = min(r[k] / TEACHER[k] for k in keys)
                print(f"| {name} | {r[keys[0]]:.2f} / {r[keys[1]]:.2f} / {r[keys[2]]:.2f} | {r[keys[3]]:.3f} | {r[keys[4]]:.3f} | {low:.1%} |")
        sys.exit(0)
    if "--merge" in args:  # --merge INTO FILE ...: rows of parallel runs into one file, in ROWS order
        into = Path(args[args.index("--merge") + 1])
        merged = json.loads(into.read_text()) if into.exists() else {}
        for part in args[args.index("--merge") + 2:]:
            merged |= json.loads(Path(part).read_text())
        into.write_text(json.dumps({k: merged[k] for k in sorted(merged, key=lambda k: (k not in ROWS, list(ROWS).index(k) if k in ROWS else 0))}, indent=1))
        sys.exit(0)
    out = Path("docs/half-ablation.json")
    if "--out" in args:
        i = args.index("--out")
        out, args = Path(args[i + 1]), args[:i] + args[i + 2:]
    results = json.loads(out.read_text()) if out.exists() else {}
    unknown = [name for name in args if name not in ROWS and name != "--warm"]
    if unknown:
        sys.exit(f"unknown rows: {unknown} (--list shows them)")
    wanted = args or [name for name in ROWS if name not in results]
    world = Path("runs/ablation-world")
    if not (world / "pope").is_dir():
        world = generate_world(world, seed=0, train_size=1, overwrite=True).root  # the held-out sets
    if "--warm" in args:  # the held-out world, the training world and its prepared data, nothing else
        run_distill(recipe_of("layers 1,2,4,7; plain", {"training.max_steps": 1, "optimizer.warmup_steps": 0,
                    "optimizer.decay_steps": 0, "output.dir": "runs/half-ablation/warm", "output.overwrite": True}))
        sys.exit(0)
    for name in wanted:
        recipe = recipe_of(name, {"output.dir": f"runs/half-ablation/{list(ROWS).index(name)}",
                                  "output.overwrite": True, "output.save_every": 0,
                                  "training.num_workers": 0})  # one process a row; CPU runs have none anyway
        t = time.time()
        final = run_distill(recipe)
        seconds = round(time.time() - t)
        scores = benchmark_scores(load_hybrid(final), final, world)
        results[name] = {k: round(v, 4) for k, v in scores.items()} | {"train_seconds": seconds}
        print(name, json.dumps(results[name]), flush=True)
        out.write_text(json.dumps(results, indent=1))
