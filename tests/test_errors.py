"""Bad input across the subcommands: one line on stderr naming what and where, exit 2, nothing left
half-written (issue #18). The helpers here are shared with the other test files' error cases."""

from __future__ import annotations

import io
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


def test_readme_set_example_and_broken_set_through_the_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output:\n  dir: {tmp_path / 'run'}\noptimizer:\n  lr: 1e-3\n")
    result = matvlm("distill", recipe, "--set", "optimizer.lr=[1")
    assert_one_line(result, "override 'optimizer.lr=[1'", "not valid YAML")
    # a recipe that fails a later check still proves 1e-3 and 5e-4 were read as numbers
    result = matvlm("distill", recipe, "--set", "optimizer.lr=5e-4", "--set", "output.log_every=0")
    assert_one_line(result, f"{recipe}: 'output.log_every' must be >= 1")
    assert "must be float" not in result.stderr and not (tmp_path / "run").exists()


def test_binary_recipe_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    assert_one_line(matvlm("distill", recipe), f"{recipe}: not a text file")
    assert_one_line(matvlm("convert", recipe, "-o", tmp_path / "out"), f"{recipe}: not a text file")


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
