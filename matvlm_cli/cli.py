"""The `matvlm` command line: parse options, build the recipe, hand over to an engine.

Every subcommand's settings are a typed recipe (matvlm_cli/recipes): a command takes a recipe file or a
shipped recipe's name, its flags, and `--set key=value`, layered defaults < file < flags < --set. A flag's
help, choices and default are read from its recipe field, so they are written once, there.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .choices import choices_in
from .errors import MatvlmError, MatvlmWarning
from .recipes import (
    BenchRecipe,
    ConvertRecipe,
    DistillRecipe,
    EvaluateRecipe,
    ExportRecipe,
    GenerateRecipe,
    load_recipe,
    resolve_recipe,
)

app = typer.Typer(
    help="Turn a vision-language model into a faster hybrid Mamba-2/Transformer (MaTVLM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Plain help: rich markup would read "[default: 0.25]" in a help text as a tag and drop it, and
    # would give every flag a "<bool>" value it does not take.
    rich_markup_mode=None,
)
console = Console()
errors = Console(stderr=True)
_show_warning = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, MatvlmWarning):
        errors.print(f"[yellow]warning:[/yellow] {escape(str(message))}")
    else:
        _show_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _one_line_warning
# typer >= 0.2x vendors click, whose errors then derive from typer.TyperException; older ones raise click's.
_CLICK_ERROR = getattr(typer, "TyperException", None) or importlib.import_module("click").ClickException


def _layer_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:  # an empty part ("1,,2", "1,") too: a typo, not a shorter list
        raise MatvlmError(f"--layers: {text!r} is not a comma-separated list of integers") from None


# YAML's words for true and false: a recipe path spelled like one is a flag's value, wrongly given.
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _recipe_path(recipe: Path | None, **flags: bool | None) -> Path | None:
    """The optional recipe argument, unless it is the value a user gave a flag that takes none
    (`--overwrite true`): click reads that word as the recipe, and 'true: recipe file not found' misleads."""
    if recipe is not None and not recipe.exists() and str(recipe).lower() in _BOOLEAN_WORDS:
        given = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value]
        if len(given) == 1:
            raise MatvlmError(f"{given[0]} takes no value: drop {str(recipe)!r} ({given[0]} alone turns it on)")
        if given:
            raise MatvlmError(f"flags take no value ({', '.join(given)}): drop {str(recipe)!r}")
    return resolve_recipe(recipe)


def _shown(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def option(cls, key: str, *aliases: str, help: str = "") -> typing.Any:
    """The flag for recipe field `key`: its name, help, choices and default from the field. It defaults to
    None (not given), so that a recipe file's value stands unless the flag is given."""
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    meta = field.metadata
    text = " ".join(part for part in (help, meta.get("help", "")) if part)
    allowed = choices_in(typing.get_type_hints(cls)[key])
    if allowed:
        text += f" ({' | '.join(allowed)})"
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    shown = meta.get("shown") or (None if default is None or isinstance(default, bool) else _shown(default))
    if shown:
        text += f" [default: {shown}]"
    return typer.Option(None, meta.get("flag") or "--" + key.replace("_", "-"), *aliases, help=text)


RECIPE_HELP = "A recipe YAML file, or a shipped recipe's name (`matvlm recipes` lists them); flags and --set override it."


def recipe_argument() -> typing.Any:
    return typer.Argument(None, help=RECIPE_HELP, show_default=False)


def set_option() -> typing.Any:
    return typer.Option([], "--set", metavar="KEY=VALUE", help="Set any recipe key, over the file and the flags; "
                        "dotted for nested keys (--set optimizer.lr=1e-4); the value is read as YAML; repeatable.")


@app.command()
def convert(
    recipe: Optional[Path] = recipe_argument(),
    set_: list[str] = set_option(),
    teacher: Optional[str] = option(ConvertRecipe, "teacher"),
    output: Optional[str] = option(ConvertRecipe, "output", "-o"),
    ratio: Optional[float] = option(ConvertRecipe, "ratio"),
    placement: Optional[str] = option(ConvertRecipe, "placement"),
    layers: Optional[str] = option(ConvertRecipe, "layers"),
    count: Optional[int] = option(ConvertRecipe, "count"),
    calibration: Optional[str] = option(ConvertRecipe, "calibration"),
    calibration_images: Optional[str] = option(ConvertRecipe, "calibration_images"),
    calibration_records: Optional[int] = option(ConvertRecipe, "calibration_records"),
    keep_bias: Optional[bool] = option(ConvertRecipe, "keep_bias"),
    seed: Optional[int] = option(ConvertRecipe, "seed"),
    dtype: Optional[str] = option(ConvertRecipe, "dtype"),
    overwrite: Optional[bool] = option(ConvertRecipe, "overwrite"),
    trust_remote_code: Optional[bool] = option(ConvertRecipe, "trust_remote_code"),
):
    """Replace a fraction of the teacher's attention layers with Mamba-2 layers initialised from them."""
    from .convert import run_convert

    flags = dict(
        teacher=teacher, output=output, ratio=ratio, placement=placement, layers=_layer_list(layers), count=count,
        calibration=calibration, calibration_images=calibration_images, calibration_records=calibration_records,
        keep_bias=keep_bias, seed=seed, dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code,
    )
    recipe = _recipe_path(recipe, keep_bias=keep_bias, overwrite=overwrite, trust_remote_code=trust_remote_code)
    run_convert(load_recipe(ConvertRecipe, recipe, flags, sets=set_), console)


@app.command()
def export(
    hybrid: Optional[Path] = typer.Argument(
        None, show_default=False,
        help="A hybrid directory written by convert or distill; or a recipe YAML file whose 'hybrid' names one."),
    set_: list[str] = set_option(),
    output: Optional[str] = option(ExportRecipe, "output", "-o"),
    overwrite: Optional[bool] = option(ExportRecipe, "overwrite"),
):
    """Rewrite a hybrid as a stock transformers model (GraniteMoeHybrid text model) that loads without matvlm."""
    from .export import run_export

    recipe = hybrid if hybrid is not None and hybrid.is_file() else None  # a hybrid is a folder, a recipe a file
    flags = dict(hybrid=None if recipe else hybrid and str(hybrid), output=output, overwrite=overwrite)
    parsed = load_recipe(ExportRecipe, _recipe_path(recipe, overwrite=overwrite), flags, sets=set_)
    run_export(parsed.hybrid, parsed.output, parsed.overwrite, console)


@app.command()
def distill(
    recipe: Optional[Path] = recipe_argument(),
    set_: list[str] = set_option(),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output.dir (output.resume: auto)."),
    num_gpus: int = typer.Option(
        0, "--num-gpus", min=0, help="Launch this many processes with accelerate (DDP, or FSDP with training.distributed: fsdp)."
    ),
):
    """Distil a hybrid from its teacher (KL + layer + CE losses), on a CPU, a GPU or several GPUs."""
    recipe = _recipe_path(recipe, resume=resume)
    parsed = load_recipe(DistillRecipe, recipe, {"output.resume": "auto" if resume else None}, sets=set_,
                         flag_names={"output.resume": "--resume"})
    from .distill.trainer import launch_processes, run_distill

    if num_gpus > 1:
        if recipe is None:
            raise MatvlmError("--num-gpus: name a recipe (file or shipped name) for the launched processes to read")
        raise SystemExit(launch_processes(num_gpus, recipe, set_, resume))
    run_distill(parsed, console)


@app.command()
def generate(
    recipe: Optional[Path] = recipe_argument(),
    set_: list[str] = set_option(),
    image: Optional[str] = option(GenerateRecipe, "image"),
    prompt: Optional[str] = option(GenerateRecipe, "prompt"),
    model: Optional[str] = option(GenerateRecipe, "model"),
    max_new_tokens: Optional[int] = option(GenerateRecipe, "max_new_tokens"),
    temperature: Optional[float] = option(GenerateRecipe, "temperature"),
):
    """Answer one question about one image with a teacher or a hybrid, streaming the answer."""
    from .generate import run_generate
    from .paths import default_teacher_dir

    flags = dict(image=image, prompt=prompt, model=model, max_new_tokens=max_new_tokens, temperature=temperature)
    r = load_recipe(GenerateRecipe, _recipe_path(recipe), flags, sets=set_)
    run_generate(Path(r.model) if r.model else default_teacher_dir(), Path(r.image) if r.image else None, r.prompt,
                 r.max_new_tokens, r.temperature, console)


@app.command(name="app")
def serve_app(
    model: Optional[list[Path]] = typer.Option(None, "--model", "-m", help="A teacher or hybrid VLM directory; repeat for one column each (default: the embedded teacher and its default conversion)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port on 127.0.0.1."),
):
    """Serve a local page where teacher and hybrids answer one question about one image side by side."""
    from .app.run import run_app

    run_app(model or [], port, console)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    export: Path = typer.Argument(..., help="A folder `matvlm export` wrote."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
):
    """Serve an export with vLLM's OpenAI-compatible server; further options go to `vllm serve` as given."""
    from .serve.run import run_serve

    run_serve(export, host, port, list(ctx.args), console)


def _task_list(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def evaluate(
    recipe: Optional[Path] = recipe_argument(),
    set_: list[str] = set_option(),
    model: Optional[list[str]] = option(EvaluateRecipe, "models", "-m"),
    tasks: Optional[str] = option(EvaluateRecipe, "tasks", help="Comma-separated:"),
    data_dir: Optional[str] = option(EvaluateRecipe, "data_dir"),
    limit: Optional[int] = option(EvaluateRecipe, "limit"),
    batch_size: Optional[int] = option(EvaluateRecipe, "batch_size"),
    output: Optional[str] = option(EvaluateRecipe, "output", "-o"),
    ocr: Optional[bool] = option(EvaluateRecipe, "ocr"),
    device: Optional[str] = option(EvaluateRecipe, "device"),
):
    """Score teachers and hybrids on POPE, MMMU and TextVQA (lmms-eval's rules) with the lm-eval harness."""
    from .evaluate.run import run_evaluate

    flags = dict(
        models=model or None, tasks=_task_list(tasks), data_dir=data_dir, limit=limit, batch_size=batch_size,
        output=output, ocr=ocr, device=device,
    )
    recipe = _recipe_path(recipe, ocr=ocr)
    run_evaluate(load_recipe(EvaluateRecipe, recipe, flags, sets=set_), console)


@app.command()
def bench(
    recipe: Optional[Path] = recipe_argument(),
    set_: list[str] = set_option(),
    teacher: Optional[str] = option(BenchRecipe, "teacher"),
    student: Optional[list[str]] = option(BenchRecipe, "students"),
    ratio: Optional[list[float]] = option(BenchRecipe, "ratios"),
    placement: Optional[str] = option(BenchRecipe, "placement"),
    seq_len: Optional[list[int]] = option(BenchRecipe, "seq_lens"),
    batch: Optional[list[int]] = option(BenchRecipe, "batches"),
    gen_len: Optional[int] = option(BenchRecipe, "gen_len"),
    engine: Optional[list[str]] = option(BenchRecipe, "engines"),
    backend: Optional[str] = option(BenchRecipe, "backend"),
    dtype: Optional[str] = option(BenchRecipe, "dtype"),
    throughput: Optional[list[int]] = option(BenchRecipe, "throughput_seq_lens"),
    profile: Optional[bool] = option(BenchRecipe, "profile"),
    kernels: Optional[bool] = option(BenchRecipe, "kernels"),
    repeats: Optional[int] = option(BenchRecipe, "repeats"),
    output: Optional[str] = option(BenchRecipe, "output", "-o"),
    device: Optional[str] = option(BenchRecipe, "device"),
):
    """Time prefill and decoding of the teacher and its hybrids with the same engine, against the bandwidth floor."""
    from .bench.run import run_bench

    flags = dict(
        teacher=teacher, students=student or None, ratios=ratio or None, placement=placement, seq_lens=seq_len or None,
        batches=batch or None, gen_len=gen_len, engines=engine or None, backend=backend, dtype=dtype,
        throughput_seq_lens=throughput or None, profile=profile, kernels=kernels, repeats=repeats, output=output,
        device=device,
    )
    recipe = _recipe_path(recipe, profile=profile, kernels=kernels)
    run_bench(load_recipe(BenchRecipe, recipe, flags, sets=set_), console)


recipes_app = typer.Typer(help="The recipes that ship with matvlm: list them, or copy one to edit.",
                          invoke_without_command=True, rich_markup_mode=None)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes(ctx: typer.Context):
    """List the shipped recipes (`matvlm recipes`); `matvlm recipes cp NAME DEST` copies one."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from .recipes import shipped_recipes

    table = Table(box=None, show_edge=False)
    for column in ("recipe", "command", "what it does"):
        table.add_column(column)
    for shipped in shipped_recipes():
        table.add_row(shipped.name, shipped.command, shipped.description)
    console.print(table)
    console.print("Run one by name (matvlm distill tiny-default), or copy it to edit: matvlm recipes cp NAME DEST")


@recipes_app.command(name="cp")
def copy(
    name: str = typer.Argument(..., help="A shipped recipe's name (`matvlm recipes` lists them)."),
    destination: Path = typer.Argument(..., help="A file to write, or a folder to write NAME.yaml into."),
):
    """Copy a shipped recipe, to edit it and run it as a file."""
    from .recipes import copy_recipe

    console.print(f"Copied {name} to {copy_recipe(name, destination)}", highlight=False)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own status lines and progress bars say what is happening
    hf_logging.set_verbosity_error()
    try:
        code = app(standalone_mode=False)  # so that click's errors come here, to be one line like ours
    except _CLICK_ERROR as err:
        if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(err, "ctx", None)
            _error(err.format_message() + (f" (see '{ctx.command_path} --help')" if ctx is not None else ""))
        raise SystemExit(err.exit_code) from None
    except typer.Abort:
        errors.print("Aborted.")
        raise SystemExit(1) from None
    except MatvlmError as err:
        _error(str(err))
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _error(message: str) -> None:
    errors.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
