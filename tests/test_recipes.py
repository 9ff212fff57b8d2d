"""One settings surface (issue #28): every subcommand reads a recipe file or a shipped recipe's name, its
flags and `--set`, in that order of precedence; choice lists, help texts and defaults are written once."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest
import yaml
from typer.testing import CliRunner

from matvlm_cli import choices
from matvlm_cli.cli import app
from matvlm_cli.errors import MatvlmError
from matvlm_cli.recipes import (
    BenchRecipe,
    ConvertRecipe,
    DistillRecipe,
    EvaluateRecipe,
    ExportRecipe,
    GenerateRecipe,
    build_recipe,
    copy_recipe,
    load_recipe,
    resolve_recipe,
    shipped_recipes,
)
from matvlm_cli.recipes.shipped import SHIPPED

RECIPES = {"convert": ConvertRecipe, "distill": DistillRecipe, "evaluate": EvaluateRecipe, "bench": BenchRecipe,
           "generate": GenerateRecipe, "export": ExportRecipe}


def matvlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "matvlm_cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_precedence_is_defaults_then_file_then_flags_then_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("ratio: 0.5\nplacement: back\nseed: 3\n")
    recipe = load_recipe(ConvertRecipe, path, {"placement": "front", "seed": 4}, sets=["seed=5"])
    assert (recipe.chunk_size, recipe.ratio, recipe.placement, recipe.seed) == (128, 0.5, "front", 5)
    nested = load_recipe(DistillRecipe, None, {"output.resume": "auto"}, sets=["output.resume=null", "optimizer.lr=1e-3"],
                         flag_names={"output.resume": "--resume"})
    assert nested.output.resume is None and nested.optimizer.lr == 1e-3 and nested.optimizer.schedule == "wsd"


def test_a_problem_names_what_set_the_value_last(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("seq_lens: [0]\n")
    with pytest.raises(MatvlmError, match=r"^--set seq_lens=\[1\]: 'seq_lens': 1 must be >= 2$"):
        load_recipe(BenchRecipe, path, {"seq_lens": [64]}, sets=["seq_lens=[1]"])
    with pytest.raises(MatvlmError, match=r"^--seq-len: 1 must be >= 2$"):  # the flag, named as the user typed it
        load_recipe(BenchRecipe, path, {"seq_lens": [1]})
    with pytest.raises(MatvlmError, match=rf"^{re.escape(str(path))}: 'seq_lens': 0 must be >= 2$"):
        load_recipe(BenchRecipe, path)


def test_every_subcommand_takes_a_recipe_and_set():
    import typer.main

    group = typer.main.get_command(app)
    for name in RECIPES:
        params = {p.name: p for p in group.commands[name].params}
        assert "set_" in params and params["set_"].opts == ["--set"], name
        first = group.commands[name].params[0]
        assert first.param_type_name == "argument" and not first.required, name


def test_help_and_defaults_come_from_the_recipe():
    import typer.main

    from matvlm_cli.recipes.loading import flag_of

    runner, group = CliRunner(), typer.main.get_command(app)
    for name, cls in RECIPES.items():
        text = "".join(runner.invoke(app, [name, "--help"]).output.split())  # wrapping breaks lines at hyphens too
        flags = {opt for param in group.commands[name].params for opt in getattr(param, "opts", [])}
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if flag_of(cls, field.name) not in flags:  # a key only a recipe or --set gives
                continue
            assert "".join(field.metadata["help"].split()) in text, (name, field.name)
            allowed = choices.choices_in(hints[field.name])
            if allowed:
                assert f"({'|'.join(allowed)})" in text, (name, field.name)


def test_the_choice_lists_that_are_not_derived_from_choices_py_agree_with_it():
    """The engines read their choice lists from choices.py; two things cannot: the bench's engine registry
    (a dict of classes) and convert's placements, which add "scored" to distill's."""
    from matvlm_cli.bench.engines import ENGINES

    assert tuple(ENGINES) == choices.choices(choices.Engine)
    assert (*choices.choices(choices.Placement), "scored") == choices.choices(choices.ConvertPlacement)


def test_a_choice_given_as_another_type_reads_as_the_type():
    with pytest.raises(MatvlmError, match=r"'engines' must be list\[str\], got 3; 'placement' must be str, got 2"):
        build_recipe(BenchRecipe, {"engines": 3, "placement": 2})


# ----------------------------------------------------------------------------------------- shipped recipes


def test_shipped_recipes_are_described_and_read_as_their_commands_recipe():
    shipped = {r.name: r for r in shipped_recipes()}
    assert {"tiny-default", "convert-tiny-0.25", "evaluate-tiny"} <= set(shipped)
    for recipe in shipped.values():
        assert recipe.command in RECIPES and recipe.description, recipe
        build_recipe(RECIPES[recipe.command], yaml.safe_load(recipe.path.read_text()), str(recipe.path))


def test_a_name_is_a_shipped_recipe_unless_a_file_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("tiny-default") == SHIPPED / "tiny-default.yaml"
    (tmp_path / "tiny-default").write_text("teacher: null\n")
    assert resolve_recipe("tiny-default").resolve() == (tmp_path / "tiny-default").resolve()
    for text in ("no-such-recipe", "tiny-default.yaml", "sub/tiny-default"):
        assert resolve_recipe(text) == __import__("pathlib").Path(text)


def test_recipes_cp_copies_and_never_replaces(tmp_path):
    assert copy_recipe("convert-tiny-0.25", tmp_path) == tmp_path / "convert-tiny-0.25.yaml"
    assert copy_recipe("tiny-default", tmp_path / "mine.yaml").read_text() == (SHIPPED / "tiny-default.yaml").read_text()
    with pytest.raises(MatvlmError, match="already exists"):
        copy_recipe("tiny-default", tmp_path / "mine.yaml")
    with pytest.raises(MatvlmError, match="no shipped recipe of that name"):
        copy_recipe("tiny", tmp_path)


def test_recipes_lists_and_copies_through_the_cli(tmp_path):
    result = matvlm("recipes")
    assert result.returncode == 0 and "tiny-default" in result.stdout and "distill" in result.stdout
    assert matvlm("recipes", "cp", "evaluate-tiny", tmp_path).returncode == 0
    assert (tmp_path / "evaluate-tiny.yaml").is_file()
    again = matvlm("recipes", "cp", "evaluate-tiny", tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ generate and export recipes


def test_generate_and_export_read_recipes_and_set(tmp_path, cli):
    from matvlm_cli.convert import run_convert

    hybrid = run_convert(ConvertRecipe(layers=[1], output=str(tmp_path / "hybrid")))
    recipe = tmp_path / "generate.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(hybrid), "prompt": "what is shown ?", "max_new_tokens": 64}))
    result = cli("generate", recipe, "--set", "max_new_tokens=2")
    assert result.returncode == 0, result.stderr
    assert "sample scene" in " ".join(result.stdout.split())
    missing = cli("generate", "--model", hybrid)
    assert missing.returncode == 2 and "Missing option '--prompt'" in missing.stderr

    recipe = tmp_path / "export.yaml"
    recipe.write_text(yaml.safe_dump({"hybrid": str(hybrid), "output": str(tmp_path / "first")}))
    result = cli("export", recipe, "--set", f"output={tmp_path / 'export'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "export" / "config.json").is_file() and not (tmp_path / "first").exists()
    assert "Missing option '--output'" in cli("export", hybrid).stderr
