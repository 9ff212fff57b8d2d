"""The `convert` subcommand's engine: load a teacher, replace attention layers, save, report."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .atomic import check_output_dir
from .choices import Dtype, choices
from .errors import MatvlmError
from .hybrid.cache import cache_bytes_per_token
from .hybrid.conversion import (
    PLACEMENTS,
    attention_geometry,
    attention_windows,
    choose_layers,
    convert_to_hybrid,
    find_decoder,
    layer_count,
    not_carried,
)
from .hybrid.layouts import load_config, model_class_for, weight_files
from .hybrid.load import load_teacher
from .hybrid.processors import load_processor
from .hybrid.saving import save_hybrid
from .recipes import ConvertRecipe

SCORED = "scored"  # chosen from calibration data (placement.py) rather than by position
CHART = "placement-scores.png"  # written beside the weights by --placement scored


def default_output(recipe: ConvertRecipe, teacher: Path) -> Path:
    size = f"{recipe.count}of" if recipe.count is not None else f"{recipe.ratio:g}"
    tag = f"layers{'-'.join(map(str, recipe.layers))}" if recipe.layers else f"{size}-{recipe.placement}"
    return Path(f"{teacher.name}-hybrid-{tag}")


def check_recipe(recipe: ConvertRecipe) -> None:
    if recipe.placement not in (*PLACEMENTS, SCORED):
        raise MatvlmError(f"placement: {recipe.placement!r} is not one of {', '.join((*PLACEMENTS, SCORED))}")
    if recipe.placement == SCORED and recipe.layers is not None:
        raise MatvlmError("--placement scored chooses the layers itself: give --ratio or --count, not --layers")
    if recipe.placement == SCORED and recipe.calibration is not None and not Path(recipe.calibration).is_file():
        raise MatvlmError(f"calibration: {recipe.calibration} does not exist")
    if recipe.calibration_records < 1:
        raise MatvlmError(f"calibration_records: must be positive, got {recipe.calibration_records}")
    if recipe.layers is None and recipe.ratio is not None and not 0 < recipe.ratio <= 1:
        raise MatvlmError(f"ratio: {recipe.ratio} is outside (0, 1]")
    if recipe.dtype not in choices(Dtype):
        raise MatvlmError(f"dtype: {recipe.dtype!r} is not one of {', '.join(choices(Dtype))}")
    if recipe.chunk_size < 1:
        raise MatvlmError(f"chunk_size: must be positive, got {recipe.chunk_size}")


def run_convert(recipe: ConvertRecipe, console: Console | None = None) -> Path:
    console = console or Console()
    check_recipe(recipe)
    if recipe.teacher is None:
        from .paths import default_teacher_dir

        teacher_dir = default_teacher_dir()
        console.print(f"No teacher given: using the embedded default at {teacher_dir}")
    else:
        teacher_dir = Path(recipe.teacher)
    # Everything that can be checked from the config and the files' headers is checked before the weights are read.
    config = load_config(teacher_dir, recipe.trust_remote_code)
    weight_files(teacher_dir)
    output = default_output(recipe, teacher_dir) if recipe.output is None else recipe.output
    output = check_output_dir(output, "--output", overwrite=recipe.overwrite, inputs=(teacher_dir,))
    with torch.device("meta"):  # the architecture's layout, without reading or allocating weights
        find_decoder(model_class_for(config).from_config(config, trust_remote_code=recipe.trust_remote_code))
    text_config = config.get_text_config(decoder=True)
    num_layers, windows = text_config.num_hidden_layers, attention_windows(text_config)
    scored = recipe.placement == SCORED
    if scored:
        k = layer_count(num_layers, recipe.ratio, recipe.count)  # before any weight is read
    else:
        layers = choose_layers(num_layers, recipe.ratio, recipe.placement, recipe.layers, windows, recipe.count)

    dtype = recipe.dtype if recipe.dtype == "auto" else getattr(torch, recipe.dtype)
    with console.status(f"Loading teacher {teacher_dir}"):
        model = load_teacher(teacher_dir, dtype=dtype, trust_remote_code=recipe.trust_remote_code)
    layout = find_decoder(model)
    if scored:
        layers, extra = _score(recipe, teacher_dir, model, layout, k, windows, console)
    else:
        extra = {}
    geometry = attention_geometry(layout.attention(layers[0]), text_config)
    dropped = not_carried(layout, layers, keep_bias=recipe.keep_bias)
    params_before = sum(p.numel() for p in model.parameters())

    with console.status(f"Converting {len(layers)} of {num_layers} layers"):
        mixer_config = convert_to_hybrid(
            model, layers, keep_bias=recipe.keep_bias, seed=recipe.seed, chunk_size=recipe.chunk_size,
            source=str(teacher_dir), ratio=len(layers) / num_layers, placement=None if recipe.layers else recipe.placement,
            **extra,
        )
    params_after = sum(p.numel() for p in model.parameters())

    with console.status(f"Writing {output}"):
        save_hybrid(model, output, source=teacher_dir, overwrite=recipe.overwrite)
    if scored:
        from .placement import LayerScore, bar_chart

        scores = [LayerScore(**s) for s in extra["placement_scores"]]
        bar_chart(scores, layers, output / CHART, f"{teacher_dir.name}: each layer converted alone; converted: {layers}")

    dtype_bytes = next(model.parameters()).element_size()
    kv_layer = cache_bytes_per_token(geometry.num_kv_heads, geometry.head_dim, dtype_bytes)
    context = text_config.max_position_embeddings
    kv_tokens = [context if window is None else min(window, context) for window in windows]
    kept = [i for i in range(num_layers) if i not in layers]
    state = mixer_config.state_bytes(conv_bytes=dtype_bytes)
    report = Table(title=f"matvlm convert: {teacher_dir.name} -> {output}")
    report.add_column("")
    report.add_column("teacher", justify="right")
    report.add_column("hybrid", justify="right")
    report.add_row("attention layers", str(num_layers), str(len(kept)))
    report.add_row("Mamba-2 layers", "0", f"{len(layers)}  {layers}")
    report.add_row("parameters", f"{params_before:,}", f"{params_after:,}")
    full = [i for i, window in enumerate(windows) if window is None]
    report.add_row(
        "KV cache bytes / token" + (" (global layers)" if len(full) < num_layers else ""),
        f"{len(full) * kv_layer:,}", f"{len([i for i in kept if i in full]) * kv_layer:,}",
    )
    report.add_row(
        f"KV cache bytes / sequence at {context:,} tokens",
        f"{sum(kv_tokens) * kv_layer:,}", f"{sum(kv_tokens[i] for i in kept) * kv_layer:,}",
    )
    report.add_row("fixed state bytes / sequence", "0", f"{len(layers) * state:,}")
    console.print(report)
    if len(full) < num_layers:
        on_global = sum(1 for i in layers if i in full)
        console.print(
            f"sliding-window teacher: {on_global} of the {len(layers)} converted layers are global layers "
            f"({len(full)} of {num_layers} are); a window layer's KV cache is at most {max(w for w in windows if w):,} tokens"
            + (", so --placement even takes the global layers first" if recipe.layers is None and recipe.placement == "even" else "")
        )
    for line in dropped:
        console.print(f"[yellow]not carried:[/yellow] {line}")
    console.print(f"Saved hybrid to [bold]{output}[/bold]")
    return output


def _score(recipe: ConvertRecipe, teacher_dir: Path, model, layout, k: int, windows, console: Console) -> tuple[list[int], dict]:
    """--placement scored: every layer's cost on the calibration records, the k cheapest, the ranking."""
    from .placement import OUTLIER, load_calibration, pick_scored, ranking_table, score_layers, scores_block

    processor = load_processor(teacher_dir, trust_remote_code=recipe.trust_remote_code)
    text_config = model.config.get_text_config(decoder=True)
    max_length = min(2048, getattr(text_config, "max_position_embeddings", 2048) or 2048)
    with console.status("Reading calibration records"):
        calibration = load_calibration(recipe.calibration, recipe.calibration_images, processor, recipe.calibration_records,
                                       recipe.seed, max_length, console)
    console.print(f"calibration: {calibration.records} image records from {calibration.source} (seed {recipe.seed})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    home = next(model.parameters()).device
    model.to(device)
    try:
        scores = score_layers(model, layout, calibration.batches, seed=recipe.seed, console=console)
    finally:
        model.to(home)
    layers, demoted = pick_scored(scores, k, windows)
    console.print(ranking_table(scores, layers, windows))
    if demoted:
        console.print(f"sliding-window teacher: global layer(s) {demoted} cost over {OUTLIER:g}x the median layer, so they "
                      "come after the window layers")
    return layers, scores_block(scores, calibration, recipe.seed, demoted)
