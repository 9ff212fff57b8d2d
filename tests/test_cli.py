"""`matvlm convert` end to end, and its handling of bad input: one line, non-zero exit, nothing written.
Two tests run the command in a process of its own (`matvlm`); the others through the entry point in this
process (the `cli` fixture), which checks the same output without 3-5 s of imports each."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from matvlm_cli.hybrid import load_hybrid, load_teacher


def matvlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "matvlm_cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi"])
def test_convert_writes_a_loadable_hybrid(tiny_teachers, tmp_path, family, cli):
    out = tmp_path / "hybrid"
    result = cli("convert", "--teacher", tiny_teachers[family], "--ratio", 0.25, "--placement", "even", "--output", out)
    assert result.returncode == 0, result.stderr
    assert "KV cache bytes / token" in result.stdout
    block = json.loads((out / "config.json").read_text())["matvlm"]
    assert block["layers"] == [0] and block["placement"] == "even" and block["source"] == str(tiny_teachers[family])
    assert block["mixer"]["nheads"] == 4 and block["mixer"]["d_state"] == block["mixer"]["headdim"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in out.iterdir())
    hybrid, teacher = load_hybrid(out), load_teacher(tiny_teachers[family])
    ids = torch.tensor([[2, 30, 31, 32, 33]])
    with torch.no_grad():
        h, t = hybrid(input_ids=ids).logits, teacher(input_ids=ids).logits
    assert h.shape == t.shape and not torch.allclose(h, t)  # layer 0 really changed


def test_recipe_file_with_cli_override(tiny_teachers, tmp_path, cli):
    recipe = tmp_path / "convert.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": str(tiny_teachers["mistral"]), "ratio": 0.5, "placement": "back",
                                      "output": str(tmp_path / "from-recipe")}))
    result = cli("convert", recipe, "--placement", "front")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "from-recipe" / "config.json").read_text())["matvlm"]["layers"] == [0, 1]


def test_shipped_recipes_validate():
    from pathlib import Path

    from matvlm_cli.recipes import ConvertRecipe, load_recipe

    recipes = sorted(Path(__file__).parents[1].glob("recipes/convert-*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(ConvertRecipe, path)


def bad_recipe(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    return path


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda t, p: ["--teacher", p / "missing"], "no such file or directory"),
        (lambda t, p: ["--teacher", p], "not a model directory"),
        (lambda t, p: ["--teacher", t, "--ratio", 1.5], "ratio: 1.5 is outside (0, 1]"),
        (lambda t, p: ["--teacher", t, "--ratio", 0], "ratio: 0.0 is outside (0, 1]"),
        (lambda t, p: ["--teacher", t, "--layers", "1,1"], "duplicate"),
        (lambda t, p: ["--teacher", t, "--layers", "0,7"], "out of range"),
        (lambda t, p: ["--teacher", t, "--layers", "a"], "--layers"),
        (lambda t, p: ["--teacher", t, "--placement", "sideways"], "placement"),
        (lambda t, p: [bad_recipe(p, "ratio: 0.5\nratoi: 2\n"), "--teacher", t], "unknown key 'ratoi'"),
        (lambda t, p: [bad_recipe(p, "ratio: half\n"), "--teacher", t], "'ratio' must be"),
        (lambda t, p: [bad_recipe(p, "ratio: [0.5\n"), "--teacher", t], "not valid YAML"),
        (lambda t, p: [p / "nope.yaml"], "recipe file not found"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(tiny_teachers, tmp_path, make_args, message, cli):
    out = tmp_path / "out"
    result = cli("convert", *make_args(tiny_teachers["llama"], tmp_path), "--output", out)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_unsupported_architecture_is_a_user_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    result = matvlm("convert", "--teacher", tmp_path / "gpt2", "--output", tmp_path / "out")
    assert result.returncode != 0 and "unsupported architecture GPT2LMHeadModel" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(tiny_teachers, tmp_path, cli):
    """--overwrite replaces an empty folder or matvlm's own output, never a folder holding the user's files
    (issue #23)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("convert", "--teacher", tiny_teachers["llama"], "--output", out)
    assert result.returncode != 0 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = cli("convert", "--teacher", tiny_teachers["llama"], "--output", out, "--overwrite")
    assert result.returncode == 2 and "not a folder matvlm wrote" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # the empty folder, then what the first run wrote
        result = cli("convert", "--teacher", tiny_teachers["llama"], "--output", out, "--overwrite")
        assert result.returncode == 0, result.stderr
        assert (out / "config.json").is_file()


def test_converting_a_hybrid_again_is_refused(tiny_teachers, tmp_path, cli):
    assert cli("convert", "--teacher", tiny_teachers["llama"], "--output", tmp_path / "h").returncode == 0
    result = cli("convert", "--teacher", tmp_path / "h", "--output", tmp_path / "hh")
    assert result.returncode != 0 and "already a matvlm hybrid" in result.stderr


def test_default_teacher_is_used_without_a_teacher_argument(tmp_path):
    result = matvlm("convert", "--ratio", "0.25", "--placement", "even", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    produced = tmp_path / "tiny-teacher-hybrid-0.25-even"
    assert json.loads((produced / "config.json").read_text())["matvlm"]["layers"] == [0, 4]  # 8 layers
    assert load_hybrid(produced) is not None
