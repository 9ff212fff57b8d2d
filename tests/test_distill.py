"""`matvlm distill`: shared teacher/student weights, losses, data handling, checkpoints and resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ports import free_port
from safetensors.torch import load_file

from matvlm_cli.distill.shared import SharedTeacherStudent
from matvlm_cli.distill.trainer import run_distill
from matvlm_cli.errors import MatvlmError
from matvlm_cli.hybrid import convert_to_hybrid, find_decoder, load_hybrid, load_teacher, save_hybrid
from matvlm_cli.paths import default_teacher_dir
from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe
from matvlm_cli.world import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w") / "world", seed=3, train_size=48).root


def recipe_values(world, out, **sections):
    values = {
        "data": [{"json": str(world / "train" / "conversations.json"), "image_root": str(world / "train")}],
        "model_max_length": 400,
        "optimizer": {"lr": 1e-3, "warmup_steps": 1, "decay_steps": 2},
        "training": {"batch_size": 4, "max_steps": 4},
        "output": {"dir": str(out), "save_every": 2},
    }
    for key, value in sections.items():
        values[key] = values.get(key, {}) | value if isinstance(value, dict) else value
    return values


class Interrupt(Exception):
    """Stands for a run killed after a step (Ctrl-C, a lost node)."""


def stop_at(last: int):
    def on_step(step):
        if step == last:
            raise Interrupt
    return on_step


def make(values):
    recipe = build_recipe(DistillRecipe, values)
    check_distill_recipe(recipe)
    return recipe


def test_one_copy_of_the_shared_weights_and_exact_teacher_path():
    teacher = load_teacher(default_teacher_dir())
    reference = load_teacher(default_teacher_dir())
    attentions = {i: find_decoder(teacher).attention(i) for i in (0, 4)}
    convert_to_hybrid(teacher, [0, 4])
    shared = SharedTeacherStudent(teacher, attentions)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), shared.teacher_path(shared.model) as as_teacher:
        assert torch.equal(as_teacher(input_ids=ids).logits, reference(input_ids=ids).logits)
    distinct = {p.data_ptr() for p in shared.model.parameters()}
    teacher_params = sum(p.numel() for p in reference.parameters())
    held = sum(p.numel() for p in shared.model.parameters())
    assert len(distinct) == len(list(shared.model.parameters()))
    assert held < 1.2 * teacher_params  # two full models would be 2x
    trainable = {n for n, p in shared.model.named_parameters() if p.requires_grad}
    assert trainable and all(".mamba." in n for n in trainable)


def test_interrupted_run_resumed_gives_the_same_weights(world, tmp_path):
    straight = run_distill(make(recipe_values(world, tmp_path / "a")))

    with pytest.raises(Interrupt):
        run_distill(make(recipe_values(world, tmp_path / "b")), on_step=stop_at(2))
    assert (tmp_path / "b" / "checkpoints" / "step-0000002" / "state.json").is_file()
    resumed = run_distill(make(recipe_values(world, tmp_path / "b", output={"resume": "auto"})))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    teacher = load_file(default_teacher_dir() / "model.safetensors")
    mixer_key = next(k for k in a if "self_attn.in_proj.weight" in k)
    assert mixer_key not in teacher  # the final output is the hybrid
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert {"kl", "layer", "loss", "lr", "tokens_per_s"} <= log[-1].keys()


@pytest.mark.parametrize("trainable", ["mamba+connector", "all"])
def test_wider_trainable_settings_train_what_they_say(world, tmp_path, trainable):
    final = run_distill(make(recipe_values(world, tmp_path / "run", trainable=trainable, training={"max_steps": 2})))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"kl", "layer"} <= log[-1].keys() and all(math.isfinite(e["loss"]) for e in log)
    teacher, hybrid = load_file(default_teacher_dir() / "model.safetensors"), load_file(final / "model.safetensors")
    connector = next(k for k in teacher if "multi_modal_projector" in k and k.endswith("weight"))
    mlp = next(k for k in teacher if ".mlp." in k and k.endswith("weight"))
    assert not torch.equal(teacher[connector], hybrid[connector])
    assert torch.equal(teacher[mlp], hybrid[mlp]) == (trainable != "all")


def last_log(run):
    return json.loads((run / "log.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("section,change,check", [
    ("losses", {"kl_positions": "response", "layer_loss": "cosine"}, lambda log: log["layer"] < 2),  # cosine distance <= 2
    ("losses", {"layer_loss": "mse", "ce_weight": 1.0}, lambda log: log["ce"] > 0),
    ("optimizer", {"schedule": "constant"}, lambda log: log["lr"] == 1e-3),
    ("optimizer", {"schedule": "cosine"}, lambda log: log["lr"] == 0.0),
    ("training", {"batch_size": 2, "gradient_accumulation": 2}, lambda log: log["step"] == 4),
])
def test_recipe_settings_run_end_to_end(world, tmp_path, section, change, check):
    run_distill(make(recipe_values(world, tmp_path / "run", **{section: change})))
    log = last_log(tmp_path / "run")
    assert math.isfinite(log["loss"]) and check(log), log


def test_an_fsdp_recipe_runs_unchanged_in_one_process(world, tmp_path):
    run_distill(make(recipe_values(world, tmp_path / "run", training={"max_steps": 2, "distributed": "fsdp"})))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["distributed"] == "NO"


def test_gradient_checkpointing_gives_the_same_weights(world, tmp_path):
    plain = run_distill(make(recipe_values(world, tmp_path / "a", training={"max_steps": 2})))
    checkpointed = run_distill(make(recipe_values(world, tmp_path / "b", training={"max_steps": 2, "gradient_checkpointing": True})))
    a, b = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_converted_hybrid_as_the_student(world, tmp_path):
    model = load_teacher(default_teacher_dir())
    convert_to_hybrid(model, [1, 7])
    save_hybrid(model, tmp_path / "hybrid", source=default_teacher_dir())
    final = run_distill(make(recipe_values(world, tmp_path / "run", student={"path": str(tmp_path / "hybrid")},
                                           training={"max_steps": 2})))
    assert load_hybrid(final).config.matvlm["layers"] == [1, 7]
    assert math.isfinite(last_log(tmp_path / "run")["loss"])


def test_final_output_is_a_loadable_hybrid_that_generates(world, tmp_path):
    final = run_distill(make(recipe_values(world, tmp_path / "run", training={"max_steps": 2}, losses={"ce_weight": 1.0})))
    model = load_hybrid(final)
    assert json.loads((final / "config.json").read_text())["matvlm"]["layers"] == [0, 4]
    out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_held_out_evaluation_and_tensorboard_logging(world, tmp_path):
    values = recipe_values(world, tmp_path / "run", output={"eval_every": 2, "eval_samples": 8, "log_every": 100})
    run_distill(make(values))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evaluated = [entry for entry in log if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluated] == [2, 4]
    assert all(entry["eval_loss"] > 0 and {"eval_kl", "eval_layer"} <= entry.keys() for entry in evaluated)
    assert evaluated[-1]["eval_loss"] < evaluated[0]["eval_loss"] * 1.5  # finite and of the same order
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_broken_records_are_skipped_and_reported(world, tmp_path):
    records = json.loads((world / "train" / "conversations.json").read_text())[:6]
    records[0]["image"] = "images/missing.png"
    records[1]["conversations"][0]["value"] = records[1]["conversations"][0]["value"].replace("<image>\n", "")
    records[2]["conversations"] += [{"from": "human", "value": "Describe the image briefly."},
                                    {"from": "gpt", "value": "A large red circle at the top. " * 10}] * 10  # too long
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    values = recipe_values(world, tmp_path / "run", training={"max_steps": 1})
    values["data"] = [{"json": str(broken), "image_root": str(world / "train")}]
    from matvlm_cli.distill.trainer import DistillRun

    run = DistillRun(make(values))
    run.setup()
    skipped = run.dataset.skipped
    reasons = sorted(skipped.counts)
    assert skipped.total == 3 and len(reasons) == 3
    assert reasons[0].startswith("longer than model_max_length") and reasons[1:] == ["missing image file", "no <image> in the first human turn"]
    assert len(run.dataset) == 3
    assert any(records[0]["id"] in line for line in skipped.lines())


def test_all_bad_data_is_an_error(world, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "image": "nope.png", "conversations": []}]))
    values = recipe_values(world, tmp_path / "run")
    values["data"] = [{"json": str(bad), "image_root": str(world / "train")}]
    with pytest.raises(MatvlmError, match="no usable record"):
        run_distill(make(values))


def test_nan_loss_stops_with_a_clear_message(world, tmp_path):
    values = recipe_values(world, tmp_path / "run", optimizer={"lr": 1e30, "warmup_steps": 0, "schedule": "constant"},
                           training={"max_steps": 4})
    with pytest.raises(MatvlmError, match="loss became .* Last good checkpoint"):
        run_distill(make(values))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"losses": {"klweight": 1}}, "unknown key 'losses.klweight'"),
        ({"training": {"batch_size": "8"}}, "'training.batch_size' must be int"),
        ({"trainable": "everything"}, "'trainable' must be one of"),
        ({"losses": {"kl_weight": 0, "layer_weight": 0, "ce_weight": 0}}, "every weight is 0"),
        ({"data": [{"json": "/nope.json", "image_root": "/"}]}, "'data[0].json': /nope.json not found"),
        ({"teacher": "/nowhere"}, "'teacher': /nowhere is not a model directory"),
        ({"training": {"distributed": "zero3"}}, "'training.distributed' must be one of ddp, fsdp"),
    ],
)
def test_recipe_errors_are_one_line_before_any_model_loads(world, tmp_path, change, message):
    values = recipe_values(world, tmp_path / "run")
    for key, value in change.items():
        values[key] = values.get(key, {}) | value if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    result = subprocess.run([sys.executable, "-m", "matvlm_cli", "distill", str(path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_shipped_distill_recipes_validate():
    from pathlib import Path

    from matvlm_cli.recipes import read_yaml

    for path in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):
        if not path.name.startswith(("convert-", "evaluate-")):
            build_recipe(DistillRecipe, read_yaml(path))


def test_half_ablation_rows_are_valid_recipes_and_one_is_the_committed_one(tmp_path):
    """experiments/half_ablation.py's rows (docs/distill.md's 0.5 ablation) each build a valid recipe, the common
    ground is the previous 0.5 recipe, the recipe's row equals recipes/tiny-default-0.5.yaml, and
    --merge/--table read the sweep's files."""
    import dataclasses
    import importlib.util

    from matvlm_cli.recipes import read_yaml

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("half_ablation", root / "experiments/half_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    recipes = {name: ablation.recipe_of(name, {}) for name in ablation.ROWS}
    plain = recipes["layers 1,2,4,7; plain"]
    assert (plain.student.layers, plain.trainable, plain.losses.kl_positions) == ([1, 2, 4, 7], "mamba", "response")
    committed = build_recipe(DistillRecipe, read_yaml(root / "recipes/tiny-default-0.5.yaml"))
    committed_row = recipes["layers 1,3,4,7; converted + KL all; layer loss 3; 800 steps"]
    assert dataclasses.asdict(committed_row) == dataclasses.asdict(committed)
    stepwise = recipes["layers 1,2,4,7; stepwise"]
    assert [(s.layers, s.max_steps) for s in stepwise.stages] == [([1, 7], 250), ([1, 2, 4, 7], 400)]

    sweep = json.loads((root / "docs/results/distill/half-sweep-h200.json").read_text())
    assert set(sweep) - {"_note"} <= set(ablation.ROWS)
    parts = []
    for i, name in enumerate(["layers 1,2,4,7; plain", "layers 1,3,4,7"]):
        parts.append(tmp_path / f"row-{i}.json")
        parts[-1].write_text(json.dumps({name: sweep[name]}))
    script = [sys.executable, str(root / "experiments/half_ablation.py")]
    merged = tmp_path / "merged.json"
    subprocess.run([*script, "--merge", str(merged), *map(str, parts[::-1])], check=True, cwd=root)
    assert list(json.loads(merged.read_text())) == ["layers 1,2,4,7; plain", "layers 1,3,4,7"]  # ROWS order
    table = subprocess.run([*script, "--table", str(merged)], check=True, cwd=root, capture_output=True, text=True).stdout
    assert "| layers 1,2,4,7; plain | 0.82 / 0.86 / 0.88 | 0.833 | 0.882 | 88.0% |" in table


def test_embedded_world_adds_its_reading_turns_again(tmp_path, monkeypatch):
    """Without `data`, distill reads the embedded world's conversations plus their reading turns at
    EMBEDDED_READING_WEIGHT (a small world stands in for the 20k-scene one)."""
    from rich.console import Console

    from matvlm_cli.distill.loaders import EMBEDDED_READING_WEIGHT, embedded_world_sources
    from matvlm_cli.world.writers import WORLD_VERSION

    monkeypatch.setenv("MATVLM_CACHE", str(tmp_path))
    world = generate_world(tmp_path / f"world-seed0-distill-v{WORLD_VERSION}", seed=0, train_size=120,
                           pope_per_category=2, mmmu_size=5, textvqa_size=2)
    conversations, reading = embedded_world_sources(Console())
    assert conversations.json == str(world.train_json) and conversations.weight == 1.0
    assert reading.weight == EMBEDDED_READING_WEIGHT > 1 and reading.image_root == conversations.image_root
    records = json.loads(open(reading.json).read())
    assert records and all(len(r["conversations"]) == 2 for r in records)


def launch_two_processes(recipe_path, *extra, fsdp_on_cpu=False):
    """A real `accelerate launch` of two CPU processes: its torchrun path (--multi_gpu) with
    ACCELERATE_USE_CPU gives DDP over gloo (`--cpu --num_processes 2` would start one process). Each launch
    gets a free port: torchrun's default one would be shared by launches running at once (pytest -n)."""
    entry = [str(Path(__file__).parent / "fsdp_on_cpu.py")] if fsdp_on_cpu else ["-m", "matvlm_cli"]
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
         *entry, "distill", str(recipe_path), *extra],
        # Hidden GPUs keep CPU processes off CUDA on a machine that has some.
        capture_output=True, text=True, env=os.environ | {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""},
    )


@pytest.fixture(scope="module")
def two_process_ddp(world, tmp_path_factory):
    """A two-process DDP run of four steps, with a checkpoint at step 2."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    values = recipe_values(world, tmp_path / "run", training={"batch_size": 2, "max_steps": 4}, output={"log_every": 1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    result = launch_two_processes(path)
    assert result.returncode == 0, result.stderr[-3000:]
    return path, tmp_path / "run"


def test_two_process_run_and_resume_through_accelerate_launch(two_process_ddp, tmp_path):
    """Two processes run to a final hybrid and one log; a two-process run resumed from the first run's
    mid-way checkpoint ends with the same weights."""
    path, run = two_process_ddp
    assert load_hybrid(run / "final").config.matvlm["distill_steps"] == 4
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the main process alone writes the log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == "MULTI_CPU"

    checkpoint = run / "checkpoints" / "step-0000002"
    result = launch_two_processes(path, "--set", f"output.dir={tmp_path / 'resumed'}", "--set", f"output.resume={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stdout
    a, b = load_file(run / "final" / "model.safetensors"), load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_matches_ddp_and_resumes_exactly(two_process_ddp, tmp_path):
    """The same recipe under FSDP2 (two CPU processes, see fsdp_on_cpu.py) logs the same losses and ends
    with the same hybrid as under DDP, up to float summation order; its checkpoints resume exactly."""
    path, ddp = two_process_ddp
    fsdp = tmp_path / "fsdp"
    result = launch_two_processes(path, "--set", "training.distributed=fsdp", "--set", f"output.dir={fsdp}", fsdp_on_cpu=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((fsdp / "summary.json").read_text())["distributed"] == "FSDP"
    fsdp_log = [json.loads(line) for line in (fsdp / "log.jsonl").read_text().splitlines()]
    ddp_log = [json.loads(line) for line in (ddp / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in fsdp_log] == [1, 2, 3, 4]
    for f, d in zip(fsdp_log, ddp_log):
        assert f["loss"] == pytest.approx(d["loss"], rel=1e-4)
    sharded, reference = load_file(fsdp / "final" / "model.safetensors"), load_file(ddp / "final" / "model.safetensors")
    assert sharded.keys() == reference.keys()  # whole, tied weights written once
    assert all(torch.allclose(sharded[k], reference[k], atol=1e-5) for k in sharded)
    assert not all(torch.equal(sharded[k], reference[k]) for k in sharded)  # a different engine did run

    result = launch_two_processes(path, "--set", "training.distributed=fsdp", "--set", f"output.dir={tmp_path / 'resumed'}",
                                  "--set", f"output.resume={fsdp / 'checkpoints' / 'step-0000002'}", fsdp_on_cpu=True)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded)


def test_resume_is_exact_across_epochs(world, tmp_path):
    # 16 of the world's records, 4 batches an epoch: stopped in epoch 1 after a checkpoint, resumed, ended in
    # epoch 2 (the same path as with the world's 48 records and 12 batches an epoch, in 21 steps instead of 65)
    data = tmp_path / "sixteen.json"
    data.write_text(json.dumps(json.loads((world / "train" / "conversations.json").read_text())[:16]))

    def values(out, **output):
        values = recipe_values(world, out, training={"max_steps": 10}, optimizer={"warmup_steps": 2, "decay_steps": 5},
                               output={"save_every": 7, "keep_checkpoints": 1} | output)
        values["data"] = [{"json": str(data), "image_root": str(world / "train")}]
        return values

    straight = run_distill(make(values(tmp_path / "a")))

    with pytest.raises(Interrupt):
        run_distill(make(values(tmp_path / "b")), on_step=stop_at(8))
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-0000007" / "state.json").read_text())
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 3
    resumed = run_distill(make(values(tmp_path / "b", resume="auto")))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_a[-1]["epoch"] == 2 and log_a[-1]["loss"] == log_b[-1]["loss"]
    assert 0 <= log_a[-1]["padding"] < 0.5


def test_nan_stop_names_a_checkpoint_whose_weights_are_finite(world, tmp_path):
    values = recipe_values(world, tmp_path / "run", optimizer={"lr": 1e30, "warmup_steps": 0, "schedule": "constant"},
                           training={"max_steps": 6}, output={"save_every": 1, "keep_checkpoints": 5})
    with pytest.raises(MatvlmError, match="Last good checkpoint") as stopped:
        run_distill(make(values))
    named = str(stopped.value).split("Last good checkpoint: ")[1].split(". ")[0]
    if named != "none":
        weights = load_file(Path(named) / "trainable.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
        optimizer = torch.load(Path(named) / "optimizer.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for s in optimizer["state"].values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point())
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):  # every checkpoint written is a good one
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "trainable.safetensors").values())


def test_a_failed_run_leaves_nothing_behind_and_can_be_run_again(world, tmp_path):
    values = recipe_values(world, tmp_path / "run", optimizer={"lr": 1e30, "warmup_steps": 0, "schedule": "constant"},
                           training={"max_steps": 4}, output={"save_every": 0})
    with pytest.raises(MatvlmError):
        run_distill(make(values))
    assert not (tmp_path / "run").exists()
    run_distill(make(recipe_values(world, tmp_path / "run", training={"max_steps": 1})))  # not "already exists"


@pytest.mark.parametrize("damage", ["not a checkpoint", "truncated"])
def test_resuming_from_a_bad_checkpoint_is_one_line(world, tmp_path, damage):
    with pytest.raises(Interrupt):
        run_distill(make(recipe_values(world, tmp_path / "run")), on_step=stop_at(2))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    if damage == "truncated":
        data = (checkpoint / "optimizer.pt").read_bytes()
        (checkpoint / "optimizer.pt").write_bytes(data[: len(data) // 2])
        target, message = checkpoint, "truncated or corrupt"
    else:
        target, message = tmp_path / "elsewhere", "is not a checkpoint of matvlm distill"
        target.mkdir()
    with pytest.raises(MatvlmError, match=message):
        run_distill(make(recipe_values(world, tmp_path / "run", output={"resume": str(target)})))


def test_an_output_dir_that_is_a_file_is_refused_even_with_overwrite(world, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(MatvlmError, match="exists and is not a directory"):
        run_distill(make(recipe_values(world, tmp_path / "run", output={"overwrite": True})))
    assert (tmp_path / "run").read_text() == "not a folder"


def test_unreadable_images_are_counted_in_the_summary_and_all_unreadable_is_an_error(world, tmp_path):
    records = json.loads((world / "train" / "conversations.json").read_text())[:12]
    (tmp_path / "images").mkdir()
    for i, record in enumerate(records):
        (tmp_path / "images" / f"{i}.png").write_bytes((world / "train" / record["image"]).read_bytes() if i else b"GIF89a broken")
        record["image"] = f"images/{i}.png"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    values = recipe_values(world, tmp_path / "run", training={"max_steps": 4, "batch_size": 4})
    values["data"] = [{"json": str(data), "image_root": str(tmp_path)}]
    run_distill(make(values))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(summary["unreadable_images"].values()) >= 1
    for i in range(len(records)):
        (tmp_path / "images" / f"{i}.png").write_bytes(b"GIF89a broken")
    values["output"]["dir"] = str(tmp_path / "run2")
    with pytest.raises(MatvlmError, match="a whole epoch gave no usable batch"):
        run_distill(make(values))


def test_the_gpu_throughput_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "experiments/gpu/distill_throughput.py"), "--tiny", "--batches", "2",
                    "--checkpointing", "off", "--steps", "2", "--warmup", "1", "--output", str(out)],
                   check=True, env=os.environ | {"MATVLM_CACHE": str(tmp_path / "cache")}, capture_output=True)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["tokens_per_s"] > 0 and row["tokens_per_step"] > 2 * 15 and row["losses_last"]["kl"] >= 0


def stepwise_values(world, out, **output):
    """Three stages on the tiny world: layer 1 alone, then layers 1 and 5 with the whole converted layers
    trained and no layer loss, then an end-to-end stage at a lower lr."""
    values = recipe_values(world, out, training={"max_steps": None}, optimizer={"warmup_steps": 1, "decay_steps": 1},
                           output={"save_every": 1, "keep_checkpoints": 10, "log_every": 1} | output)
    values["stages"] = [
        {"layers": [1], "max_steps": 2},
        {"layers": [1, 5], "max_steps": 2, "trainable": "converted", "losses": {"layer_weight": 0.0}},
        {"layers": [1, 5], "max_steps": 1, "losses": {"layer_weight": 0.0, "ce_weight": 0.5}, "optimizer": {"lr": 5e-4}},
    ]
    return values


def test_stepwise_stages_resume_exactly_in_a_stage_and_at_its_boundary(world, tmp_path):
    straight = run_distill(make(stepwise_values(world, tmp_path / "a")))
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log] == [0, 0, 1, 1, 2] and "layer" in log[1] and "layer" not in log[2]
    assert log[-1]["lr"] == 0.0 and "ce" in log[-1]
    a = load_file(straight / "model.safetensors")
    teacher = load_file(default_teacher_dir() / "model.safetensors")
    hybrid = load_hybrid(straight).config.matvlm
    assert hybrid["layers"] == [1, 5] and [s["steps"] for s in hybrid["distill_stages"]] == [2, 2, 1]
    mlp = lambda i: next(k for k in teacher if f"layers.{i}.mlp." in k)  # noqa: E731
    assert not torch.equal(a[mlp(5)], teacher[mlp(5)]) and not torch.equal(a[mlp(1)], teacher[mlp(1)])
    assert torch.equal(a[mlp(3)], teacher[mlp(3)])  # not converted: untouched

    with pytest.raises(Interrupt):
        run_distill(make(stepwise_values(world, tmp_path / "b")), on_step=stop_at(3))
    checkpoints = tmp_path / "b" / "checkpoints"
    assert [json.loads((checkpoints / f"step-000000{n}" / "state.json").read_text())["stage"] for n in (1, 2, 3)] == [0, 1, 1]
    # step 1: inside stage 0; step 2: at the boundary, where layer 5 has no optimizer state yet
    for n in (1, 2):
        resumed = run_distill(make(stepwise_values(world, tmp_path / f"from-{n}", resume=str(checkpoints / f"step-000000{n}"))))
        b = load_file(resumed / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n


def test_without_stages_the_run_is_unchanged_by_the_stage_machinery(world, tmp_path):
    """A recipe without `stages` and the same run written as one stage give the same weights."""
    plain = run_distill(make(recipe_values(world, tmp_path / "a", student={"layers": [1, 5]})))
    values = recipe_values(world, tmp_path / "b", training={"max_steps": None})
    values["stages"] = [{"layers": [1, 5], "max_steps": 4}]
    staged = run_distill(make(values))
    a, b = load_file(plain / "model.safetensors"), load_file(staged / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_the_converted_layers_keeps_the_teacher_path_exact():
    """`trainable: converted` trains the converted layers' norms and MLPs too: frozen copies of the
    teacher's layers serve the teacher path, so changing the student's leaves the teacher as it was."""
    teacher = load_teacher(default_teacher_dir())
    reference = load_teacher(default_teacher_dir())
    attentions = {i: find_decoder(teacher).attention(i) for i in (1, 5)}
    convert_to_hybrid(teacher, [1, 5])
    shared = SharedTeacherStudent(teacher, attentions, "converted")
    trainable = {n for n, p in shared.model.named_parameters() if p.requires_grad}
    assert any("layers.5.mlp." in n for n in trainable) and not any("layers.3." in n or ".attention." in n for n in trainable)
    with torch.no_grad():
        for name, param in shared.model.named_parameters():
            if param.requires_grad:
                param.add_(0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), shared.teacher_path(shared.model) as as_teacher:
        assert torch.equal(as_teacher(input_ids=ids).logits, reference(input_ids=ids).logits)
    decoder = shared.model.model.language_model
    with shared.teacher_path(shared.model):
        assert decoder.layers[5] is shared.teacher_layer(5) is not shared.decoder_layer(5)  # the copy, swapped in
    assert decoder.layers[5] is shared.decoder_layer(5)  # and back
    shared.set_stage([1], "converted")  # layer 5 not converted yet: the student runs its attention, untrained
    assert not any("layers.5." in n for n, p in shared.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("trainable, layers, active", [("converted", [2, 5], [2, 5]), ("mamba", [2, 5], [2, 5]),
                                                      ("converted", [2, 5], [5]), ("converted", [0, 5], [0, 5])])
def test_the_shared_prefix_shortcut_gives_the_same_losses_and_gradients(trainable, layers, active):
    """The student pass replays the teacher's output of the layers before the first converted one, and that
    layer's layer loss reuses its student-pass output: the same losses and gradients as computing it all,
    with those layers run once per step (by the teacher) and the first converted layer once. In float64: the
    two paths round differently in float32, by 1.3e-6 in one gradient element on an AVX-512 machine (session
    20), past a 1e-6 bound that AVX2 machines kept (tests/test_distill_shapes.py's `in_float64`)."""
    from accelerate import Accelerator

    from matvlm_cli.distill.objective import DistillationObjective, weighted_total
    from matvlm_cli.recipes import LossWeights

    teacher = load_teacher(default_teacher_dir()).double()
    attentions = {i: find_decoder(teacher).attention(i) for i in layers}
    convert_to_hybrid(teacher, layers)
    shared = SharedTeacherStudent(teacher, attentions, trainable)
    shared.set_stage(active, trainable)
    torch.manual_seed(0)
    ids = torch.randint(4, 900, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "model_inputs": ["attention_mask"]}
    weights = LossWeights(layer_weight=3.0, ce_weight=0.5)
    objective = DistillationObjective(Accelerator(cpu=True), shared)
    calls = {"before": 0, "first": 0}
    before = shared.decoder_layers[0].register_forward_hook(lambda *_: calls.__setitem__("before", calls["before"] + 1))
    first = shared.decoder_layer(layers[0]).register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))

    def losses_and_grads():
        shared.model.zero_grad(set_to_none=True)
        parts = objective(shared.model, batch, weights)
        weighted_total(parts, weights).backward()
        return parts, {n: p.grad.clone() for n, p in shared.model.named_parameters() if p.grad is not None}

    short_parts, short_grads = losses_and_grads()
    shortcut_calls = dict(calls)
    shared.shared_prefix = lambda: None  # every layer computed in both passes, as before the shortcut
    full_parts, full_grads = losses_and_grads()
    before.remove(), first.remove()
    assert short_parts.keys() == full_parts.keys() == {"kl", "ce", "layer"}
    for key in full_parts:
        torch.testing.assert_close(short_parts[key], full_parts[key], rtol=1e-5, atol=1e-6)
    assert short_grads.keys() == full_grads.keys() and short_grads
    for name in full_grads:
        torch.testing.assert_close(short_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)
    if layers[0] > 0:  # the student pass replays layer 0: the teacher ran it once
        assert shortcut_calls["before"] == 1 and calls["before"] == 3
    has_layer_loss = layers[0] in active  # not yet converted in the stage: it runs attention, with no layer loss
    # The first converted layer: once in the student pass, plus its layer-loss call unless reused (the teacher
    # pass runs a frozen copy of it under `converted`, and it as attention under `mamba`).
    teacher_runs = 0 if trainable == "converted" else 1
    assert shortcut_calls["first"] == teacher_runs + 1
    assert calls["first"] - shortcut_calls["first"] == teacher_runs + 1 + has_layer_loss
