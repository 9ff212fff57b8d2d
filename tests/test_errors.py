"""Bad input across the subcommands: one line on stderr naming what and where, exit 2, nothing left
half-written (issue #18). The helpers here are shared with the other test files' error cases. Bad option
values go through a process of its own (`matvlm`); the other command lines through the entry point in this
process (the `cli` fixture, conftest.py)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from matvlm_cli.images import ImageError, open_rgb


def matvlm(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "matvlm_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def assert_one_line(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height pixels: a few dozen bytes that PIL would expand to
    hundreds of megabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def png_bytes(size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data,reason",
    [
        (bomb_png(), "decompression bomb"),  # over twice PIL's limit: DecompressionBombError
        (bomb_png(10000, 10000), "decompression bomb"),  # over the limit: only a warning in PIL
        (b"not an image", "not a recognised image format"),
        (png_bytes((64, 64))[:70], "truncated"),
    ],
)
def test_open_rgb_turns_every_decoding_failure_into_one_error(data, reason):
    with pytest.raises(ImageError) as error:
        open_rgb(data, "row 3")
    message = str(error.value)
    assert message.startswith("row 3: cannot be read as an image (") and reason in message
    assert "BytesIO" not in message and "\n" not in message


def test_open_rgb_names_the_path_and_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (5, 4), 7).save(path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    with pytest.raises(ImageError, match=f"^{tmp_path / 'missing.png'}: cannot be read as an image"):
        open_rgb(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------------ recipes


def distill_recipe(tmp_path, **sections):
    from matvlm_cli.recipes import DistillRecipe, build_recipe

    sections["output"] = {"dir": str(tmp_path / "run"), **sections.get("output", {})}
    return build_recipe(DistillRecipe, sections, source="r.yaml")


@pytest.mark.parametrize("text", ["lr: 5e-4", "lr: 5E-4", "lr: 1e3", "lr: 1.0e-3", "lr: .5"])
def test_numbers_as_people_write_them_are_floats_in_files(tmp_path, text):
    from matvlm_cli.recipes import read_yaml

    path = tmp_path / "r.yaml"
    path.write_text(f"optimizer:\n  {text}\n  warmup_steps: 10\nname: 1e\n")
    values = read_yaml(path)
    assert values["optimizer"]["lr"] == float(text.split(": ")[1])
    assert values["optimizer"]["warmup_steps"] == 10 and isinstance(values["optimizer"]["warmup_steps"], int)
    assert values["name"] == "1e"  # not a number in any YAML


def test_set_overrides_read_numbers_and_report_broken_yaml(tmp_path):
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.recipes import DistillRecipe, build_recipe, parse_override, set_dotted

    values = {}
    set_dotted(values, *parse_override("optimizer.lr=5e-4"))
    assert build_recipe(DistillRecipe, values).optimizer.lr == 5e-4
    with pytest.raises(MatvlmError, match=r"^override 'optimizer.lr=\[1'.*not valid YAML"):
        parse_override("optimizer.lr=[1")


def test_readme_set_example_and_broken_set_through_the_cli(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output:\n  dir: {tmp_path / 'run'}\noptimizer:\n  lr: 1e-3\n")
    result = cli("distill", recipe, "--set", "optimizer.lr=[1")
    assert_one_line(result, "override 'optimizer.lr=[1'", "not valid YAML")
    # a recipe that fails a later check still proves 1e-3 and 5e-4 were read as numbers
    result = cli("distill", recipe, "--set", "optimizer.lr=5e-4", "--set", "output.log_every=0")
    assert_one_line(result, "--set output.log_every=0: 'output.log_every' must be >= 1")  # the --set, not the file (#23)
    assert "must be float" not in result.stderr and not (tmp_path / "run").exists()


def test_binary_recipe_is_one_line(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    assert_one_line(cli("distill", recipe), f"{recipe}: not a text file")
    assert_one_line(cli("convert", recipe, "-o", tmp_path / "out"), f"{recipe}: not a text file")


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"output": {"log_every": 0}}, "'output.log_every' must be >= 1"),
        ({"training": {"num_workers": -1}}, "'training.num_workers' must be >= 0"),
        ({"optimizer": {"betas": [2.0, 0.9]}}, "'optimizer.betas' must be two numbers in [0, 1)"),
        ({"optimizer": {"lr": float("nan")}}, "'optimizer.lr' must be a finite number > 0, got nan"),
        ({"optimizer": {"lr": float("inf")}}, "'optimizer.lr' must be a finite number > 0, got inf"),
        ({"optimizer": {"weight_decay": -1}}, "'optimizer.weight_decay' must be a finite number >= 0"),
        ({"output": {"keep_checkpoints": 0}}, "'output.keep_checkpoints' must be >= 1"),
        ({"output": {"keep_checkpoints": -1}}, "'output.keep_checkpoints' must be >= 1"),
        ({"output": {"dir": ""}}, "'output.dir' is empty"),
    ],
)
def test_distill_values_that_would_crash_later_are_refused_up_front(tmp_path, sections, message):
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.recipes import check_distill_recipe

    recipe = distill_recipe(tmp_path, **sections)
    with pytest.raises(MatvlmError) as error:
        check_distill_recipe(recipe, source="r.yaml")
    assert str(error.value).startswith("r.yaml: ") and message in str(error.value)


def test_recipe_check_errors_start_with_the_recipe_path_when_there_is_data(tmp_path):
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.recipes import check_distill_recipe

    recipe = distill_recipe(tmp_path, data=[{"json": str(tmp_path / "d.json"), "image_root": str(tmp_path)}],
                            training={"epochs": 0})
    with pytest.raises(MatvlmError) as error:
        check_distill_recipe(recipe, source="r.yaml")
    assert str(error.value).startswith("r.yaml: ") and "DataSource" not in str(error.value)


# ---------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "--ratio", "abc"], "Invalid value for '--ratio'"),
        (["distill", "r.yaml", "--num-gpus", "-3"], "Invalid value for '--num-gpus'"),
        (["bench", "--bogus"], "No such option: --bogus"),
    ],
)
def test_bad_option_values_are_one_line_without_a_box(args, message):
    result = matvlm(*args)
    assert_one_line(result, f"error: {message}", "--help")
    assert "╭" not in result.stderr and "Usage:" not in result.stderr + result.stdout


def test_layer_list_with_an_empty_entry_is_refused():
    from matvlm_cli.cli import _layer_list
    from matvlm_cli.errors import MatvlmError

    assert _layer_list("1, 2") == [1, 2]
    for text in ("1,,2", "1,", ","):
        with pytest.raises(MatvlmError, match="--layers"):
            _layer_list(text)


def test_empty_output_paths_are_refused(tiny_teachers, tmp_path, monkeypatch):
    from matvlm_cli.bench.run import run_bench
    from matvlm_cli.convert import run_convert
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.run import check_recipe
    from matvlm_cli.recipes import BenchRecipe, ConvertRecipe, EvaluateRecipe

    monkeypatch.chdir(tmp_path)
    for call in (lambda: run_convert(ConvertRecipe(teacher=str(tiny_teachers["llama"]), output="")),
                 lambda: check_recipe(EvaluateRecipe(output="")),
                 lambda: run_bench(BenchRecipe(output=" ", device="cpu"))):
        with pytest.raises(MatvlmError, match="--output: the path is empty"):
            call()
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- model folders


def _break(folder, how):
    import json

    import torch
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if how == "missing weights":
        weights.unlink()
    elif how == "corrupt weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "wrong-typed config":
        config = json.loads((folder / "config.json").read_text())
        config["text_config"]["hidden_size"] = "64"
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "no processor":
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
    elif how == "pickle weights":
        torch.save(load_file(weights), folder / "pytorch_model.bin")
        weights.unlink()


BROKEN = {
    "missing weights": "model.safetensors: not found",
    "corrupt weights": "model.safetensors: not a readable safetensors file",
    "wrong-typed config": "config.json: cannot be read as a transformers config: TypeError: Field 'hidden_size' expected int",
    "no processor": "no usable processor",
    "pickle weights": "has only pickle weights (pytorch_model.bin), and matvlm reads safetensors only",
}


@pytest.fixture(scope="module")
def broken_models(tiny_teachers, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("broken")
    folders = {}
    for how in BROKEN:
        folders[how] = root / how.replace(" ", "-")
        shutil.copytree(tiny_teachers["llama"], folders[how])
        _break(folders[how], how)
    return folders


@pytest.mark.parametrize("how", [h for h in BROKEN if h != "no processor"])
def test_broken_model_folders_fail_to_load_naming_the_file(broken_models, how):
    """load_teacher is what convert, bench and distill load teachers with."""
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.hybrid import load_teacher

    with pytest.raises(MatvlmError) as error:
        load_teacher(broken_models[how])
    assert str(error.value).startswith(str(broken_models[how])) and BROKEN[how] in str(error.value)
    assert "\n" not in str(error.value)


def test_pickle_weights_are_refused_with_how_to_convert(broken_models, tmp_path):
    from matvlm_cli.convert import run_convert
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.recipes import ConvertRecipe

    with pytest.raises(MatvlmError, match=r"safetensors only\. If you trust the file, convert it once: .*save_pretrained"):
        run_convert(ConvertRecipe(teacher=str(broken_models["pickle weights"]), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", list(BROKEN))
def test_every_subcommand_checks_model_folders(broken_models, how, tmp_path):
    """generate, bench and evaluate (whose second model is the broken one) stop before any work."""
    from matvlm_cli.bench.run import run_bench
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.run import run_evaluate
    from matvlm_cli.generate import run_generate
    from matvlm_cli.paths import default_teacher_dir
    from matvlm_cli.recipes import BenchRecipe, EvaluateRecipe

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    folder = broken_models[how]
    bench = lambda: run_bench(BenchRecipe(teacher=str(folder), seq_lens=[64], gen_len=4, repeats=1, device="cpu",  # noqa: E731
                                          output=str(tmp_path / "bench")))
    if how == "no processor":
        # bench feeds token ids and builds the family's image processor from the config when the folder
        # has none (as for its config-only presets), so a folder without processor files benches
        bench()
        assert (tmp_path / "bench" / "bench.json").is_file()
        shutil.rmtree(tmp_path / "bench")
    calls = [
        lambda: run_generate(folder, image, "what is shown ?"),
        *([] if how == "no processor" else [bench]),
        lambda: run_evaluate(EvaluateRecipe(models=[str(default_teacher_dir()), str(folder)], tasks=["pope"],
                                            limit=1, device="cpu", output=str(tmp_path / "evaluate"))),
    ]
    for call in calls:
        with pytest.raises(MatvlmError) as error:
            call()
        assert BROKEN[how] in str(error.value)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "evaluate").exists()


def test_a_broken_model_is_one_line_exit_2_from_the_cli(broken_models, tmp_path, cli):
    result = cli("convert", "--teacher", broken_models["corrupt weights"], "-o", tmp_path / "out")
    assert_one_line(result, BROKEN["corrupt weights"])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("where", ["is", "inside", "around"])
def test_convert_refuses_an_output_that_is_inside_or_around_the_teacher(tiny_teachers, tmp_path, where):
    import shutil

    from matvlm_cli.convert import run_convert
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.recipes import ConvertRecipe

    teacher = tmp_path / "models" / "teacher"
    shutil.copytree(tiny_teachers["llama"], teacher)
    before = sorted(p.name for p in teacher.iterdir())
    output = {"is": teacher, "inside": teacher / "hybrid", "around": tmp_path / "models"}[where]
    with pytest.raises(MatvlmError, match="the input"):
        run_convert(ConvertRecipe(teacher=str(teacher), output=str(output), overwrite=True))
    assert sorted(p.name for p in teacher.iterdir()) == before
    assert "matvlm" not in (teacher / "config.json").read_text()


def test_outputs_that_are_files_or_under_files_are_refused_before_the_work(tiny_teachers, tmp_path):
    from matvlm_cli.bench.run import run_bench
    from matvlm_cli.convert import run_convert
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.run import run_evaluate
    from matvlm_cli.recipes import BenchRecipe, ConvertRecipe, EvaluateRecipe

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    calls = {
        "convert": lambda out: run_convert(ConvertRecipe(teacher=str(tiny_teachers["llama"]), output=out, overwrite=True)),
        "bench": lambda out: run_bench(BenchRecipe(teacher=str(tiny_teachers["llama"]), seq_lens=[64], gen_len=4,
                                                   repeats=1, ratios=[0.25], device="cpu", output=out)),
        "evaluate": lambda out: run_evaluate(EvaluateRecipe(tasks=["pope"], limit=1, device="cpu", output=out)),
    }
    for name, call in calls.items():
        for output, message in ((a_file, "exists and is not a directory"), (a_file / "sub", "not a directory, so")):
            with pytest.raises(MatvlmError, match=message):
                call(str(output))
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_parent_is_refused(tmp_path):
    from matvlm_cli.atomic import check_output_dir
    from matvlm_cli.errors import MatvlmError

    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(MatvlmError, match="not writable"):
        check_output_dir(tmp_path / "ro" / "out")


def test_stale_temp_folders_of_killed_writers_are_removed_on_the_next_run(tmp_path):
    from matvlm_cli import atomic

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = atomic._HOST
    stale = [f".out.{host}-{dead.pid}-k1ll3d.tmp", ".out.ab12cd34.tmp", ".out.old-{}".format(dead.pid),
             f".log.json.{host}-{dead.pid}-x9.tmp"]
    kept = [f".out.{host}-{os.getpid()}-alive.tmp", f".out.otherhost-{dead.pid}-maybe.tmp", ".outer.ab12cd34.tmp"]
    for name in stale + kept:
        (tmp_path / name).mkdir() if "log.json" not in name else (tmp_path / name).write_text("half")
    (tmp_path / "out").mkdir()
    with atomic.atomic_directory(tmp_path / "out", overwrite=True) as temp:
        (temp / "weights").write_text("new")
    atomic.write_atomic(tmp_path / "log.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out", "log.json"])
    assert (tmp_path / "out" / "weights").read_text() == "new"


# ------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize(
    "prompt,temperature,image,message",
    [
        ("<image> <image> what?", 0.0, png_bytes(), "--prompt: contains '<image>'"),
        ("what?", float("nan"), png_bytes(), "--temperature: must be a finite number >= 0, got nan"),
        ("what?", 0.0, bomb_png(), "decompression bomb"),
        ("what?", 0.0, bomb_png(10000, 10000), "decompression bomb"),
    ],
    ids=["two image placeholders", "nan temperature", "bomb", "bomb under twice the limit"],
)
def test_generate_refuses_bad_prompts_temperatures_and_images(tmp_path, prompt, temperature, image, message):
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.generate import run_generate
    from matvlm_cli.paths import default_teacher_dir

    path = tmp_path / "image.png"
    path.write_bytes(image)
    with pytest.raises(MatvlmError) as error:
        run_generate(default_teacher_dir(), path, prompt, max_new_tokens=2, temperature=temperature)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- bench


def test_bench_refuses_a_context_beyond_the_models_positions(tmp_path):
    from matvlm_cli.bench.run import run_bench
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.recipes import BenchRecipe

    # the embedded teacher has 1024 positions; a preset (random weights, an architecture to time) is exempt
    with pytest.raises(MatvlmError, match="a context of 1028 tokens .* max_position_embeddings of 1024"):
        run_bench(BenchRecipe(seq_lens=[64, 1024], gen_len=4, repeats=1, device="cpu", output=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "stages,message",
    [
        ([{"layers": [1, 4, 6, 7], "max_steps": 5}, {"layers": [1, 7], "max_steps": 5}],
         "'stages[1].layers' [1, 7] drops layer(s) [4, 6] of stages[0]"),
        ([{"layers": [1, 7], "max_steps": 5}, {"layers": [7, 1, 4, 6], "max_steps": 5}],
         "'stages[1].layers' [7, 1, 4, 6] must be in ascending order"),
        ([{"layers": [1, 7], "max_steps": 5}, {"layers": [1, 7, 8], "max_steps": 5}],
         "'stages[1].layers': [8] out of range for the teacher's 8 layers (0..7)"),
        ([{"layers": [1, 7], "max_steps": 0}], "'stages[0].max_steps' must be >= 1"),
        ([{"layers": [1, 7], "max_steps": 5, "optimizer": {"betas": [0.9, 0.9]}}], "'stages[0].optimizer.betas' cannot change per stage"),
        ([{"layers": [1, 7], "max_steps": 5, "trainable": "mlp"}], "stages[0]: 'trainable' must be one of"),
    ],
)
def test_bad_stage_lists_are_one_line_naming_the_stage_before_any_model_loads(tmp_path, stages, message, cli):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output": {"dir": str(tmp_path / "run")}, "stages": stages}))
    assert_one_line(cli("distill", recipe), f"{recipe}: ", message)
    assert not (tmp_path / "run").exists()
