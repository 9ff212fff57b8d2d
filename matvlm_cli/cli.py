"""The `matvlm` command line: parse options, build the recipe, hand over to an engine."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import MatvlmError, MatvlmWarning

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
    return recipe


@app.command()
def convert(
    recipe: Optional[Path] = typer.Argument(None, help="YAML recipe; the options below override it."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model directory (default: the embedded tiny teacher)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Where to write the hybrid."),
    ratio: Optional[float] = typer.Option(None, help="Fraction of decoder layers to replace, in (0, 1]. [default: 0.25]"),
    placement: Optional[str] = typer.Option(None, help="even | front | middle | back | scored (the k layers whose conversion costs least on calibration data). [default: even]"),
    layers: Optional[str] = typer.Option(None, help="Explicit layer indices, e.g. 0,4,8 (overrides --ratio)."),
    count: Optional[int] = typer.Option(None, help="How many layers to replace (instead of --ratio)."),
    calibration: Optional[str] = typer.Option(None, help="--placement scored: a LLaVA-format data JSON (default: the embedded world)."),
    calibration_images: Optional[str] = typer.Option(None, help="Folder the calibration JSON's images are relative to (default: its folder)."),
    calibration_records: Optional[int] = typer.Option(None, help="Image records drawn (by --seed) to score layers on. [default: 64]"),
    keep_bias: Optional[bool] = typer.Option(None, "--keep-bias", help="Carry attention biases into the mixer."),
    seed: Optional[int] = typer.Option(None, help="Seed for the Mamba-2 parameters not taken from attention. [default: 0]"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16. [default: auto]"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an output directory matvlm wrote (or an empty one)."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow the teacher's own modelling code."),
):
    """Replace a fraction of the teacher's attention layers with Mamba-2 layers initialised from them."""
    from .convert import run_convert
    from .recipes import ConvertRecipe, load_recipe

    overrides = dict(
        teacher=teacher, output=output, ratio=ratio, placement=placement, layers=_layer_list(layers), count=count,
        calibration=calibration, calibration_images=calibration_images, calibration_records=calibration_records,
        keep_bias=keep_bias, seed=seed, dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code,
    )
    recipe = _recipe_path(recipe, keep_bias=keep_bias, overwrite=overwrite, trust_remote_code=trust_remote_code)
    run_convert(load_recipe(ConvertRecipe, recipe, overrides), console)


@app.command()
def export(
    hybrid: Path = typer.Argument(..., help="A hybrid directory written by convert or distill."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the stock transformers model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an output directory matvlm wrote (or an empty one)."),
):
    """Rewrite a hybrid as a stock transformers model (GraniteMoeHybrid text model) that loads without matvlm."""
    from .export import run_export

    run_export(hybrid, output, overwrite, console)


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/tiny-default.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set optimizer.lr=1e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output.dir."),
    num_gpus: int = typer.Option(
        0, "--num-gpus", min=0, help="Launch this many processes with accelerate (DDP, or FSDP with training.distributed: fsdp)."
    ),
):
    """Distil a hybrid from its teacher (KL + layer + CE losses), on a CPU, a GPU or several GPUs."""
    from .recipes import DistillRecipe, load_recipe

    parsed = load_recipe(DistillRecipe, recipe, {"output.resume": "auto" if resume else None}, sets=set_,
                         flag_names={"output.resume": "--resume"})
    from .distill.trainer import launch_processes, run_distill

    if num_gpus > 1:
        raise SystemExit(launch_processes(num_gpus, recipe, set_, resume))
    run_distill(parsed, console)


@app.command()
def generate(
    image: Optional[Path] = typer.Option(None, help="An image file (default: a sample scene shipped with matvlm)."),
    prompt: str = typer.Option(..., help="The question or instruction."),
    model: Optional[Path] = typer.Option(None, help="A teacher or hybrid directory (default: the embedded teacher)."),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding; above 0 samples."),
):
    """Answer one question about one image with a teacher or a hybrid, streaming the answer."""
    from .generate import run_generate
    from .paths import default_teacher_dir

    run_generate(model or default_teacher_dir(), image, prompt, max_new_tokens, temperature, console)


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
    recipe: Optional[Path] = typer.Argument(None, help="YAML recipe; the options below override it."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Teacher or hybrid directory; repeat to compare side by side (default: the embedded teacher)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated: pope, mmmu, textvqa, or any lm-eval task name or task YAML. (default: pope,mmmu,textvqa)"),
    data_dir: Optional[str] = typer.Option(None, help="Folder with pope/, mmmu/, textvqa/ (hub parquet or save_to_disk) (default: the embedded synthetic sets)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N documents of each task."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per forward pass (default: 16)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Results folder (default: runs/evaluate)."),
    ocr: Optional[bool] = typer.Option(None, "--ocr", help="TextVQA: add the reference OCR tokens to the prompt (LLaVA-1.5 protocol)."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (default: auto)."),
):
    """Score teachers and hybrids on POPE, MMMU and TextVQA (lmms-eval's rules) with the lm-eval harness."""
    from .evaluate.run import run_evaluate
    from .recipes import EvaluateRecipe, load_recipe

    overrides = dict(
        models=model or None, tasks=_task_list(tasks), data_dir=data_dir, limit=limit, batch_size=batch_size,
        output=output, ocr=ocr, device=device,
    )
    recipe = _recipe_path(recipe, ocr=ocr)
    run_evaluate(load_recipe(EvaluateRecipe, recipe, overrides, flag_names={"models": "--model"}), console)


@app.command()
def bench(
    recipe: Optional[Path] = typer.Argument(None, help="YAML recipe; the options below override it."),
    teacher: Optional[str] = typer.Option(None, help="Teacher directory or preset: tinyllava-phi2-siglip-3b, llava-1.5-7b (random weights). (default: tinyllava-phi2-siglip-3b on a GPU, the embedded teacher on CPU)"),
    student: Optional[list[str]] = typer.Option(None, help="A hybrid directory; repeatable."),
    ratio: Optional[list[float]] = typer.Option(None, help="Convert the teacher in memory at this ratio; repeatable. (default: 0.25 and 0.5 when no --student)"),
    placement: Optional[str] = typer.Option(None, help="even | front | middle | back, for --ratio. [default: even]"),
    seq_len: Optional[list[int]] = typer.Option(None, "--seq-len", help="Context length in tokens, image included; repeatable. [default: 8192]"),
    batch: Optional[list[int]] = typer.Option(None, "--batch", help="Batch size; repeatable. [default: 1]"),
    gen_len: Optional[int] = typer.Option(None, help="Tokens to decode per run. [default: 128]"),
    engine: Optional[list[str]] = typer.Option(None, "--engine", help="graphs (static cache + CUDA graphs) | hf (plain generate); repeatable. [default: graphs, hf]"),
    backend: Optional[str] = typer.Option(None, help="Mixer kernels: auto | torch | triton | mamba-ssm | fla. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, help="auto | bfloat16 | float16 | float32. [default: auto: bfloat16 on GPU, float32 on CPU]"),
    throughput: Optional[list[int]] = typer.Option(None, "--throughput", help="Also find each model's largest batch at this context and its tokens/s (GPU); repeatable."),
    profile: bool = typer.Option(False, "--profile", help="Also profile one decode step per model at the first --seq-len, kernel by kernel (profile-*.txt)."),
    kernels: bool = typer.Option(False, "--kernels", help="Kernel micro-benchmark: every installed mixer backend side by side."),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats (after one warm-up); medians are reported. [default: 3]"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Folder for bench.json and bench.png. [default: runs/bench]"),
    device: Optional[str] = typer.Option(None, help="auto | cuda | cpu. [default: auto]"),
):
    """Time prefill and decoding of the teacher and its hybrids with the same engine, against the bandwidth floor."""
    from .bench.run import run_bench
    from .recipes import BenchRecipe, load_recipe

    overrides = dict(
        teacher=teacher, students=student or None, ratios=ratio or None, placement=placement, seq_lens=seq_len or None,
        batches=batch or None, gen_len=gen_len, engines=engine or None, backend=backend, dtype=dtype,
        throughput_seq_lens=throughput or None, profile=profile or None, kernels=kernels or None, repeats=repeats, output=output, device=device,
    )
    flag_names = dict(students="--student", ratios="--ratio", seq_lens="--seq-len", batches="--batch", engines="--engine",
                      throughput_seq_lens="--throughput")
    recipe = _recipe_path(recipe, kernels=kernels)
    run_bench(load_recipe(BenchRecipe, recipe, overrides, flag_names=flag_names), console)


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
