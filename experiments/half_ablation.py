"""Ablation of the 0.5 hybrid on the embedded default: each ingredient on and off, same data; held-out
scores into a JSON file (docs/results/distill/half-ablation.json by default).

    python experiments/half_ablation.py [--out FILE] [ROW ...]   (from the repository root; one full run a row,
                                                          about 11 minutes each on 2 quiet CPU cores)
    python experiments/half_ablation.py --list | --names         (the rows with their settings | their names)
    python experiments/half_ablation.py --merge INTO FILE ...    (rows of parallel runs into one file, in ROWS order)
    python experiments/half_ablation.py --table FILE             (a markdown table, with each row's lowest recovery)
    python experiments/half_ablation.py --warm                   (the worlds and the prepared data, nothing else)

Rows already in the output file are kept unless named, so rows can be run one at a time, or in
parallel processes each with its own --out (experiments/gpu/half_sweep.sh does that on one GPU).
Every row is recipes/tiny-default-0.5.yaml with the common ground below (BASE) and the row's dotted
overrides (as `--set` takes them); "layers 1,3,4,7; converted + KL all; layer loss 3; 800 steps" is the committed recipe.
Stepwise rows set `stages`: layers 1, 7 for 250 steps (warmup, then constant lr), then the row's
layers for the remaining steps (a warmup of 20, then the recipe's decay).
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

from matvlm_cli import load_hybrid
from matvlm_cli.atomic import write_atomic
from matvlm_cli.distill.trainer import run_distill
from matvlm_cli.evaluate.quality import benchmark_scores
from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe, read_yaml, set_dotted
from matvlm_cli.world import generate_world

# The rows' common ground: the recipe's file with its first 0.5 settings (layers 1, 2, 4, 7, KL on the
# answers, the mixers alone trained, the layer loss weighted 1, 650 steps), so that each row names
# everything it changes.
BASE = read_yaml("recipes/tiny-default-0.5.yaml")
for key, value in {"student.layers": [1, 2, 4, 7], "losses.kl_positions": "response", "trainable": "mamba",
                   "losses.layer_weight": 1.0, "training.max_steps": 650, "optimizer.decay_steps": 200}.items():
    set_dotted(BASE, key, value)


def stepwise(layers: list[int], steps: int, trainable: str = "mamba") -> dict:
    return {"student.layers": None, "training.max_steps": None, "stages": [
        {"layers": [1, 7], "max_steps": 250, "optimizer": {"decay_steps": 0}},
        {"layers": layers, "max_steps": steps - 250, "trainable": trainable, "optimizer": {"warmup_steps": 20}}]}


# The embedded teacher's held-out scores (docs/distill.md), for the recovery column of --table.
TEACHER = {"pope_adversarial_accuracy": 0.93, "pope_popular_accuracy": 0.95, "pope_random_accuracy": 0.96,
           "mmmu_accuracy": 0.947, "textvqa_accuracy": 1.0}


# Overrides shared by many rows: layers 1, 3, 4, 7, and the committed recipe (those layers, KL on every
# position, the converted layers' mixers, norms and MLPs trained).
LAYERS_1347 = {"student.layers": [1, 3, 4, 7]}
KL_ALL = {"losses.kl_positions": "all"}
RECIPE = LAYERS_1347 | KL_ALL | {"trainable": "converted"}

# name -> overrides of the base recipe. The first rows are the ones docs/distill.md's table names.
ROWS = {
    "layers 1,4,6,7; plain": {"student.layers": [1, 4, 6, 7]},
    "layers 1,4,6,7; stepwise + converted": stepwise([1, 4, 6, 7], 650, "converted"),
    "layers 1,2,4,7; plain": {},
    "layers 1,2,4,7; stepwise": stepwise([1, 2, 4, 7], 650),
    "layers 1,2,4,7; converted": {"trainable": "converted"},
    "layers 1,2,4,7; stepwise + converted": stepwise([1, 2, 4, 7], 650, "converted"),
    "layers 1,2,3,7": {"student.layers": [1, 2, 3, 7]},
    "layers 1,3,4,7": LAYERS_1347,
    "layers 1,2,6,7": {"student.layers": [1, 2, 6, 7]},
    "layers 1,2,4,7; 1000 steps": {"training.max_steps": 1000},
    "layers 1,2,4,7; 1400 steps": {"training.max_steps": 1400, "optimizer.decay_steps": 400},
    "layers 1,2,4,7; lr 4e-3": {"optimizer.lr": 4.0e-3},
    "layers 1,2,4,7; lr 1e-3": {"optimizer.lr": 1.0e-3},
    "layers 1,2,4,7; KL on all positions": KL_ALL,
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
    "layers 1,3,4,7; seed 1": LAYERS_1347 | {"training.seed": 1},
    "layers 1,3,4,7; converted": LAYERS_1347 | {"trainable": "converted"},
    "layers 1,3,4,7; KL on all positions": LAYERS_1347 | KL_ALL,
    "layers 1,3,4,7; converted + KL all": RECIPE,
    "layers 1,3,4,7; 1000 steps": LAYERS_1347 | {"training.max_steps": 1000},
    "layers 1,3,4,7; batch 16": LAYERS_1347 | {"training.batch_size": 16},
    "layers 1,3,4,7; converted + KL all; 1000 steps": RECIPE | {"training.max_steps": 1000},
    "layers 1,3,4,7; converted + KL all; 1000 steps; seed 1": RECIPE | {"training.max_steps": 1000, "training.seed": 1},
    "layers 1,3,4,7; converted + KL all; batch 16": RECIPE | {"training.batch_size": 16},
    "layers 1,2,4,7; converted + KL all": KL_ALL | {"trainable": "converted"},
    "layers 1,2,4,7; converted + KL all; 1000 steps": KL_ALL | {"trainable": "converted", "training.max_steps": 1000},
    "layers 1,3,5,7": {"student.layers": [1, 3, 5, 7]},
    "layers 1,3,4,7; KL on all positions; seed 1": LAYERS_1347 | KL_ALL | {"training.seed": 1},
    "layers 1,3,4,7; KL on all positions; seed 2": LAYERS_1347 | KL_ALL | {"training.seed": 2},
    "layers 1,3,4,7; converted + KL all; seed 1": RECIPE | {"training.seed": 1},
    "layers 1,3,4,7; converted + KL all; seed 2": RECIPE | {"training.seed": 2},
    "layers 1,3,4,7; converted + KL all; 800 steps": RECIPE | {"training.max_steps": 800},
    "layers 1,3,4,7; KL on all positions; 1000 steps": LAYERS_1347 | KL_ALL | {"training.max_steps": 1000},
    "layers 1,3,4,7; converted + KL all; CE 1": RECIPE | {"losses.ce_weight": 1.0},
    # The committed recipe since the third placement sweep (docs/placement.md), not run in this sweep.
    "layers 1,3,4,7; converted + KL all; layer loss 3; 800 steps": RECIPE | {
        "losses.layer_weight": 3.0, "training.max_steps": 800, "optimizer.decay_steps": 250},
}


def recipe_of(name: str, extra: dict) -> DistillRecipe:
    values = copy.deepcopy(BASE)
    for key, value in {**ROWS[name], **extra}.items():
        set_dotted(values, key, copy.deepcopy(value))
    recipe = build_recipe(DistillRecipe, values)
    check_distill_recipe(recipe)
    return recipe


SCORES = ["pope_adversarial_accuracy", "pope_popular_accuracy", "pope_random_accuracy", "mmmu_accuracy", "textvqa_accuracy"]


def table(results: dict) -> str:
    """A markdown table of a results file, with each row's lowest recovery of the teacher."""
    lines = ["| row | POPE adv. / pop. / rand. | MMMU-style | TextVQA-style | lowest recovery |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if not name.startswith("_"):
            low = min(r[k] / TEACHER[k] for k in SCORES)
            lines.append(f"| {name} | {r[SCORES[0]]:.2f} / {r[SCORES[1]]:.2f} / {r[SCORES[2]]:.2f} | {r[SCORES[3]]:.3f} "
                         f"| {r[SCORES[4]]:.3f} | {low:.1%} |")
    return "\n".join(lines)


def merge(into: Path, parts: list[Path]) -> None:
    """Rows of parallel runs joined into one file: ROWS' rows in ROWS' order, then any others (notes)."""
    merged = json.loads(into.read_text()) if into.exists() else {}
    for part in parts:
        merged |= json.loads(part.read_text())
    order = [name for name in ROWS if name in merged] + [name for name in merged if name not in ROWS]
    write_atomic(into, json.dumps({name: merged[name] for name in order}, indent=1))


def run_rows(names: list[str], out: Path) -> None:
    results = json.loads(out.read_text()) if out.exists() else {}
    world = held_out_world()
    for name in names or [name for name in ROWS if name not in results]:
        recipe = recipe_of(name, {"output.dir": f"runs/half-ablation/{list(ROWS).index(name)}",
                                  "output.overwrite": True, "output.save_every": 0,
                                  "training.num_workers": 0})  # one process a row; CPU runs have none anyway
        t = time.time()
        final = run_distill(recipe)
        seconds = round(time.time() - t)
        scores = benchmark_scores(load_hybrid(final), final, world)
        results[name] = {k: round(v, 4) for k, v in scores.items()} | {"train_seconds": seconds}
        print(name, json.dumps(results[name]), flush=True)
        write_atomic(out, json.dumps(results, indent=1))


def held_out_world() -> Path:
    world = Path("runs/ablation-world")
    if not (world / "pope").is_dir():
        world = generate_world(world, seed=0, train_size=1, overwrite=True).root
    return world


def warm() -> None:
    """The held-out world, the training world and its prepared data, so parallel rows do not race for them."""
    held_out_world()
    run_distill(recipe_of("layers 1,2,4,7; plain", {"training.max_steps": 1, "optimizer.warmup_steps": 0,
                "optimizer.decay_steps": 0, "output.dir": "runs/half-ablation/warm", "output.overwrite": True}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help="row names (default: those missing from --out)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/distill/half-ablation.json"))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--names", action="store_true")
    parser.add_argument("--merge", type=Path, metavar="INTO", help="join the row files given as ROWS into INTO")
    parser.add_argument("--table", type=Path, metavar="FILE")
    parser.add_argument("--warm", action="store_true")
    args = parser.parse_args()
    if args.list or args.names:
        for name, overrides in ROWS.items():
            print(name if args.names else f"{name}: {json.dumps(overrides)}")
    elif args.table:
        print(table(json.loads(args.table.read_text())))
    elif args.merge:
        merge(args.merge, [Path(part) for part in args.rows])
    elif args.warm:
        warm()
    else:
        unknown = [name for name in args.rows if name not in ROWS]
        if unknown:
            sys.exit(f"unknown rows: {unknown} (--list shows them)")
        run_rows(args.rows, args.out)
