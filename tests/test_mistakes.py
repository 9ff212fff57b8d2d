"""A user's mistakes and a newcomer's first steps (issue #23): each ends as one line on stderr, exit 2,
nothing destroyed and nothing left behind, or works as it should. Real command lines on tiny models
built from configs: in this process through `main()` where that is enough (the `cli` fixture, conftest.py),
in a subprocess where the process itself matters (signals, umask, a read-only mount)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_errors import assert_one_line
from tiny import build_tiny_llava

from matvlm_cli.atomic import OUTPUT_MARK, lock_directory
from matvlm_cli.paths import default_teacher_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def listing(folder: Path) -> dict[str, int]:
    """Every path under `folder` (hidden ones too) with its size: what 'nothing destroyed, nothing left
    behind' compares."""
    return {str(p.relative_to(folder)): p.stat().st_size if p.is_file() else -1 for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture(scope="module")
def hybrid(teacher, tmp_path_factory):
    from matvlm_cli.convert import run_convert
    from matvlm_cli.recipes import ConvertRecipe

    return run_convert(ConvertRecipe(teacher=str(teacher), output=str(tmp_path_factory.mktemp("hybrid") / "hybrid")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from matvlm_cli.world import generate_world

    return generate_world(tmp_path_factory.mktemp("world") / "world", seed=3, train_size=48).root


def distill_recipe(path: Path, world: Path, teacher: Path, **sections) -> Path:
    values = {
        "teacher": str(teacher),
        "data": [{"json": str(world / "train" / "conversations.json"), "image_root": str(world / "train")}],
        "model_max_length": 400,
        "training": {"batch_size": 4, "max_steps": 1},
        "output": {"dir": str(path.parent / "run")},
    }
    for key, value in sections.items():
        values[key] = values.get(key, {}) | value if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(values))
    return path


def user_folder(path: Path) -> Path:
    """A folder that is not a matvlm output: notes and a sub-folder."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub" / "data.csv").write_text("1,2")
    return path


# ------------------------------------------------------------------------------------- data destroyed


@pytest.mark.parametrize("held", ["teacher", "student", "data"])
def test_distill_never_deletes_its_own_inputs(cli, world, teacher, hybrid, tmp_path, held):
    out = tmp_path / "run"
    out.mkdir()
    inputs = {"teacher": shutil.copytree(teacher, out / "teacher"), "student": shutil.copytree(hybrid, out / "student"),
              "data": shutil.copy(world / "train" / "conversations.json", out / "data.json")}
    before = listing(out)
    recipe = distill_recipe(tmp_path / "r.yaml", world, inputs["teacher"] if held == "teacher" else teacher,
                            output={"dir": str(out), "overwrite": True},
                            student={"path": str(inputs["student"])} if held == "student" else {},
                            **({"data": [{"json": str(inputs["data"]), "image_root": str(world / "train")}]} if held == "data" else {}))
    assert_one_line(cli("distill", recipe), f"{out}: output.dir contains the input {inputs[held]}")
    assert listing(out) == before


def test_overwrite_replaces_only_what_matvlm_wrote_or_an_empty_folder(cli, world, teacher, hybrid, tmp_path):
    """convert, export and distill alike: a user's folder (notes, sub-folders) is not replaced, nor a matvlm
    output the user has added a file to; an empty folder and matvlm's own output are."""
    recipe = lambda out: distill_recipe(tmp_path / "r.yaml", world, teacher, output={"dir": str(out), "overwrite": True})  # noqa: E731
    commands = {
        "convert": lambda out: ["convert", "--teacher", teacher, "-o", out, "--overwrite"],
        "export": lambda out: ["export", hybrid, "-o", out, "--overwrite"],
        "distill": lambda out: ["distill", recipe(out)],
    }
    for name, command in commands.items():
        folder = user_folder(tmp_path / f"{name}-notes")
        before = listing(folder)
        assert_one_line(cli(*command(folder)), f"{folder}: ", "is not a folder matvlm wrote", "not replaced")
        assert listing(folder) == before
    # a matvlm output with the user's notes added
    written = tmp_path / "written"
    assert cli("convert", "--teacher", teacher, "-o", written).returncode == 0
    (written / "notes.txt").write_text("mine")
    before = listing(written)
    for name, command in commands.items():
        assert_one_line(cli(*command(written)), f"{written}: ", "holds notes.txt, which matvlm did not write")
        assert listing(written) == before
    # matvlm's own output and an empty folder are replaced
    (written / "notes.txt").unlink()
    assert cli(*commands["convert"](written)).returncode == 0
    (tmp_path / "empty").mkdir()
    assert cli(*commands["export"](tmp_path / "empty")).returncode == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


@pytest.mark.parametrize("contents", ["empty", "files"])
def test_the_current_directory_is_never_an_output_to_replace(cli, hybrid, teacher, tmp_path, monkeypatch, contents):
    here = tmp_path / "here"
    here.mkdir()
    if contents == "files":
        user_folder(here)
    monkeypatch.chdir(here)
    before = listing(here)
    for command in (["convert", "--teacher", teacher], ["export", hybrid]):
        for output in (".", "../here"):
            assert_one_line(cli(*command, "-o", output, "--overwrite"), "the current directory, which is never replaced")
    assert listing(here) == before and listing(tmp_path / "here") == before  # no temp folder either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


# ------------------------------------------------------------------------------- unwritable outputs


def read_only_run(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """`matvlm ARGS` with tmp_path/ro a read-only filesystem: a read-only tmpfs mounted in a private mount
    namespace (as root, or in a user namespace); where neither can be had, a folder without write permission
    (which root would write into anyway: then the test is skipped)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    command = [sys.executable, "-m", "matvlm_cli", *map(str, args)]
    mount = f'mount -t tmpfs -o ro tmpfs "{ro}"'
    for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which("unshare") and subprocess.run([*unshare, "sh", "-c", mount], capture_output=True).returncode == 0:
            return subprocess.run([*unshare, "sh", "-c", f'{mount} && exec "$@"', "sh", *command], capture_output=True, text=True)
    if os.geteuid() == 0:
        pytest.skip("no mount namespace for a read-only filesystem, and root writes into any folder")
    ro.chmod(0o555)
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("command", ["convert", "export", "distill"])
def test_unwritable_places_are_one_line(cli, world, teacher, hybrid, tmp_path, command):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")

    def args(output: Path):
        if command == "distill":
            return ["distill", distill_recipe(tmp_path / "r.yaml", world, teacher, output={"dir": str(output)})]
        return [*(["convert", "--teacher", teacher] if command == "convert" else ["export", hybrid]), "-o", output]

    what = "output.dir" if command == "distill" else "--output"
    assert_one_line(cli(*args(a_file / "out")), f"{a_file}: not a directory, so {what} {a_file / 'out'} cannot be made")
    assert_one_line(cli(*args(Path("/proc/matvlm-out/x"))), "/proc: not writable")
    assert_one_line(read_only_run(tmp_path, *args(tmp_path / "ro" / "out")), f"{tmp_path / 'ro'}: not writable (")
    assert a_file.read_text() == "mine" and not list(tmp_path.glob(".*"))


def test_a_failed_write_leaves_no_temp_folder_and_says_why(tmp_path):
    from matvlm_cli.atomic import atomic_directory
    from matvlm_cli.errors import MatvlmError

    target = tmp_path / "out"
    with pytest.raises(MatvlmError, match=f"^{target}: writing it failed: Is a directory \\(.*/weights\\)$"):
        with atomic_directory(target) as temp:
            (temp / "weights").mkdir()
            (temp / "weights").write_text("new")  # as a full disk or a lost mount fails a write: an OSError
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ a broken hybrid config


def test_a_hybrid_naming_a_layer_it_lacks_is_one_line(cli, hybrid, tmp_path):
    broken = shutil.copytree(hybrid, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["matvlm"]["layers"] = [0, 9]
    (broken / "config.json").write_text(json.dumps(config))
    message = f"{broken}/config.json: 'matvlm'.layers names layer 9, which the model lacks (its 4 decoder layers are 0..3)"
    assert_one_line(cli("export", broken, "-o", tmp_path / "export"), message)
    assert_one_line(cli("generate", "--model", broken, "--prompt", "what is shown ?"), message)
    assert_one_line(cli("evaluate", "-m", broken, "--tasks", "pope", "--limit", 1, "--device", "cpu", "-o", tmp_path / "e"), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


# ---------------------------------------------------------------------------------------------- bench


def test_bench_checks_the_memory_a_teacher_needs_up_front(cli, tmp_path):
    from matvlm_cli.bench.models import free_memory

    free = free_memory(torch.device("cpu"))
    if free > 27 * 2**30:  # LLaVA-1.5-7B's 7.06e9 parameters in float32 are 26.3 GiB
        pytest.skip(f"this machine has {free / 2**30:.0f} GiB free: the 7B teacher fits")
    started = time.monotonic()
    result = cli("bench", "--teacher", "llava-1.5-7b", "--device", "cpu", "-o", tmp_path / "b")
    assert_one_line(result, "llava-1.5-7b: its weights alone take 26.3 GiB in float32", "GiB free; use a GPU (--device cuda)")
    assert time.monotonic() - started < 100 and not (tmp_path / "b").exists()


def test_bench_takes_only_hybrids_as_students(cli, teacher, tmp_path):
    result = cli("bench", "--student", teacher, "--device", "cpu", "--seq-len", 64, "--gen-len", 4, "-o", tmp_path / "b")
    assert_one_line(result, f"{teacher}: --student takes a hybrid, and this model has no Mamba-2 layers")
    assert "speedup" not in result.stdout and not (tmp_path / "b").exists()


def test_bench_names_its_flags_and_a_recipe_its_keys(cli, tmp_path):
    result = cli("bench", "--seq-len", 0, "--batch", 0, "--gen-len", 1, "--device", "cpu")
    assert_one_line(result, "error: --seq-len: 0 must be >= 2; --batch: 0 must be >= 1; --gen-len must be >= 2, got 1")
    assert "seq_lens" not in result.stderr and "recipe" not in result.stderr
    recipe = tmp_path / "b.yaml"
    recipe.write_text("seq_lens: [0]\n")
    assert_one_line(cli("bench", recipe, "--batch", 0), f"error: {recipe}: 'seq_lens': 0 must be >= 2; --batch: 0 must be >= 1")


# --------------------------------------------------------------------------------- recipes and --set


def test_a_duplicated_recipe_key_names_the_key_and_both_lines(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  max_steps: 5\noptimizer:\n  lr: 1e-3\n  lr: 1e-4\n")
    assert_one_line(cli("distill", recipe), f"{recipe}:5: not valid YAML (duplicate key 'lr', first at line 4)")
    recipe.write_text("training:\n  max_steps: 5\ntraining:\n  epochs: 2\n")
    assert_one_line(cli("distill", recipe), f"{recipe}:3: not valid YAML (duplicate key 'training', first at line 1)")
    from matvlm_cli.recipes import read_yaml  # YAML's merge keys override on purpose, and still work

    recipe.write_text("base: &base {lr: 1.0e-3, warmup_steps: 2}\noptimizer:\n  <<: *base\n  lr: 5e-4\n")
    assert read_yaml(recipe)["optimizer"] == {"lr": 5e-4, "warmup_steps": 2}


def test_set_mistakes_name_the_set_and_file_mistakes_the_file(cli, world, teacher, tmp_path):
    recipe = distill_recipe(tmp_path / "r.yaml", world, teacher, optimizer={"lr": -1.0})
    result = cli("distill", recipe, "--set", "training.epochs=0", "--set", "training.bogus=1")
    assert_one_line(result, "error: --set training.bogus=1: unknown key 'training.bogus'")
    result = cli("distill", recipe, "--set", "training.epochs=0")
    assert_one_line(result, f"{recipe}: 'optimizer.lr' must be a finite number > 0, got -1.0",
                    "--set training.epochs=0: 'training.epochs' must be >= 1, got 0")
    assert not result.stderr.startswith(f"error: {recipe}: 'training") and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- distill


def test_resume_without_a_checkpoint_is_refused_and_the_old_run_kept(cli, world, teacher, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')  # a finished run saved no checkpoint (save_every 0)
    before = listing(out)
    result = cli("distill", distill_recipe(tmp_path / "r.yaml", world, teacher), "--resume")
    assert_one_line(result, f"--resume: {out} has no checkpoint to resume from (output.save_every is 0)")
    assert listing(out) == before


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_num_gpus_beyond_the_gpus_there_are_is_one_line(cli, world, teacher, tmp_path):
    result = cli("distill", distill_recipe(tmp_path / "r.yaml", world, teacher), "--num-gpus", 2)
    assert_one_line(result, f"--num-gpus 2: this machine shows {torch.cuda.device_count()} CUDA GPU(s)")
    assert not (tmp_path / "run").exists()


def test_a_second_run_into_a_locked_folder_is_refused(cli, world, teacher, tmp_path):
    """What a second `matvlm distill` into the same output.dir meets while the first holds its lock (the
    lock is taken as distill takes it; the SIGTERM test below runs two real ones)."""
    out = tmp_path / "run"
    out.mkdir()
    held = lock_directory(out, "output.dir")
    try:
        result = cli("distill", distill_recipe(tmp_path / "r.yaml", world, teacher, output={"resume": "auto"}))
    finally:
        os.close(held)
    assert_one_line(result, f"{out}: another matvlm run is writing to this output.dir now")
    assert listing(out) == {}


def test_sigterm_cleans_up_like_ctrl_c_and_a_second_run_meanwhile_is_refused(cli, world, teacher, tmp_path):
    recipe = distill_recipe(tmp_path / "r.yaml", world, teacher, training={"batch_size": 4, "max_steps": 10_000},
                            output={"save_every": 5000})
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "matvlm_cli", "distill", str(recipe)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (out / "log.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, first.communicate()
        assert (out / "log.jsonl").exists(), "the first run did not start training in 5 minutes"
        second = cli("distill", recipe, "--set", "output.overwrite=true")  # would replace the first run's folder
        assert_one_line(second, f"{out}: another matvlm run is writing to this output.dir now")
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0 and "Traceback" not in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob(".run*"))  # as after Ctrl-C: the same command runs again
    result = cli("distill", recipe, "--set", "training.max_steps=1")
    assert result.returncode == 0, result.stderr
    assert (out / "final" / "model.safetensors").is_file()


def test_nan_at_fp32_does_not_advise_fp32_and_two_human_turns_are_reported(cli, world, teacher, tmp_path):
    records = json.loads((world / "train" / "conversations.json").read_text())[:8]
    records[3]["conversations"].insert(1, {"from": "human", "value": "and?"})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    recipe = distill_recipe(tmp_path / "r.yaml", world, teacher, data=[{"json": str(data), "image_root": str(world / "train")}],
                            optimizer={"lr": 1e30, "warmup_steps": 0, "schedule": "constant"}, training={"max_steps": 4})
    result = cli("distill", recipe)
    assert f"skipped 1 record(s): two human turns in a row (e.g. {records[3]['id']})" in " ".join(result.stdout.split())
    assert_one_line(result, "loss became", "Lower optimizer.lr, or optimizer.max_grad_norm.")
    assert "fp32" not in result.stderr

    from matvlm_cli.distill.trainer import DistillRun
    from matvlm_cli.recipes import DistillRecipe, build_recipe

    bf16 = build_recipe(DistillRecipe, {"training": {"precision": "bf16"}})
    assert DistillRun(bf16)._nonfinite_advice() == "Lower optimizer.lr, or use training.precision: fp32 (it is bf16)."


# ------------------------------------------------------------------------------------------ messages


def text_only_model(path: Path) -> Path:
    from tiny import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_text_only_model_is_named_as_one(cli, tmp_path):
    model = text_only_model(tmp_path / "text")
    assert_one_line(cli("generate", "--model", model, "--prompt", "what is shown ?"),
                    f"{model}: a text-only model (LlamaForCausalLM); generate needs a vision-language model")
    result = cli("evaluate", "-m", model, "--tasks", "pope", "--limit", 1, "--device", "cpu", "-o", tmp_path / "e")
    assert_one_line(result, f"{model}: a text-only model (LlamaForCausalLM); the image task pope needs a vision-language model")
    assert "processor" not in result.stderr and not (tmp_path / "e").exists()


def test_mistral_window_longer_than_its_positions_exports(cli, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from matvlm_cli.hybrid import convert_to_hybrid, save_hybrid

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                             sliding_window=4096)).eval()
    convert_to_hybrid(model, [1])
    save_hybrid(model, tmp_path / "hybrid")
    result = cli("export", tmp_path / "hybrid", "-o", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "export" / "config.json").read_text())["layer_types"] == ["attention", "mamba"]


# ------------------------------------------------------------------------------------------ newcomer


COMMANDS = ("convert", "export", "distill", "generate", "evaluate", "bench")


def help_texts(cli) -> dict[str, str]:
    return {command: cli(command, "--help").stdout for command in COMMANDS}


def test_help_shows_defaults_and_flags_without_values(cli):
    from matvlm_cli.recipes import BenchRecipe, ConvertRecipe, EvaluateRecipe

    texts = help_texts(cli)
    for command, text in texts.items():
        assert "<bool>" not in text, (command, text)
        assert re.search(r"^\s+--help\s+Show this message", text, re.M), text
    # every option a recipe gives a value to shows that value
    for command, recipe in (("convert", ConvertRecipe()), ("evaluate", EvaluateRecipe()), ("bench", BenchRecipe())):
        flat = " ".join(texts[command].split())
        for key in ("ratio", "placement", "seed", "dtype", "batch_size", "tasks", "device", "output", "seq_lens",
                    "batches", "gen_len", "engines", "backend", "repeats"):
            value = getattr(recipe, key, None)
            if value is None or isinstance(value, bool):
                continue
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            assert re.search(rf"default: (\(|\[)?{re.escape(shown)}|default: {re.escape(shown.replace(', ', ','))}", flat), (command, key, shown)
    assert "[default: 0.25]" in " ".join(texts["convert"].split())
    from matvlm_cli.bench.models import PRESETS  # --teacher names every preset (rich may wrap one at its hyphens)
    assert all(name in "".join(texts["bench"].split()) for name in PRESETS)


def test_a_flags_value_is_not_read_as_a_recipe(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line(cli("convert", "--overwrite", "true"), "--overwrite takes no value: drop 'true'")
    assert_one_line(cli("convert", "true"), "true: recipe file not found")  # no flag given: it is a path
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_outputs_have_the_modes_the_umask_gives(cli, hybrid, tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert cli("convert", "--teacher", default_teacher_dir(), "-o", tmp_path / "hybrid").returncode == 0
        assert cli("export", hybrid, "-o", tmp_path / "export").returncode == 0
    finally:
        os.umask(previous)
    for output in (tmp_path / "hybrid", tmp_path / "export"):
        assert stat.S_IMODE(output.stat().st_mode) == 0o777 & ~umask
        files = list(output.iterdir())
        assert "model.safetensors" in {f.name for f in files} and OUTPUT_MARK in {f.name for f in files}
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~umask for f in files}


def test_generate_works_as_the_readme_shows(cli):
    commands = re.findall(r"^matvlm generate [^\n#]*", (ROOT / "README.md").read_text(), re.M)
    assert commands
    for command in commands:
        result = cli(*__import__("shlex").split(command)[1:], "--max-new-tokens", 24)
        assert result.returncode == 0, result.stderr
        assert "No --image given: asking about the sample scene" in " ".join(result.stdout.split())
        assert "circle" in result.stdout  # the teacher describes the sample scene


def test_the_readme_python_snippet_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"^## Python\n.*?```python\n(.*?)```", readme, re.S | re.M).group(1)
    from matvlm_cli.convert import run_convert
    from matvlm_cli.recipes import ConvertRecipe

    monkeypatch.chdir(tmp_path)
    run_convert(ConvertRecipe(layers=[1, 7], output="runs/tiny-hybrid-0.25"))  # `make demo`'s conversion
    printed = []
    exec(compile(snippet, "README.md", "exec"), {"print": printed.append})
    assert len(printed) == 1 and isinstance(printed[0], str) and printed[0].strip()
