"""`matvlm bench`'s recipe and its checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..choices import BENCH_PRESETS, Backend, Device, Dtype, Engine, Placement, choices
from .loading import RecipeSource, problems_error, setting


@dataclass
class BenchRecipe:
    """`matvlm bench`: teacher vs hybrids, same engine, decode speed / memory against the bandwidth floor."""

    teacher: str | None = setting(
        None, f"Teacher directory or preset (an architecture with random weights): {', '.join(BENCH_PRESETS)}.",
        shown="tinyllava-phi2-siglip-3b on a GPU, the embedded teacher on CPU")
    students: list[str] = setting(help="A hybrid directory; repeatable.", factory=list, flag="--student")
    ratios: list[float] | None = setting(None, "Convert the teacher in memory at this ratio; repeatable.", flag="--ratio",
                                         shown="0.25 and 0.5 when no --student")
    placement: Placement = setting("even", "Where --ratio's converted layers go.")
    seq_lens: list[int] = setting(help="Context length in tokens, image included; repeatable.",
                                  factory=lambda: [8192], flag="--seq-len")
    batches: list[int] = setting(help="Batch size; repeatable.", factory=lambda: [1], flag="--batch")
    gen_len: int = setting(128, "Tokens to decode per run.")
    engines: list[Engine] = setting(
        help="graphs = static cache + CUDA graphs, hf = plain generate; repeatable (the first is the fair comparison).",
        factory=lambda: ["graphs", "hf"], flag="--engine")
    backend: Backend = setting("auto", "Mixer kernels.")
    dtype: Dtype = setting("auto", "Weights' dtype.", shown="auto: bfloat16 on GPU, float32 on CPU")
    throughput_seq_lens: list[int] = setting(
        help="Also find each model's largest batch at this context and its tokens/s (GPU); repeatable.",
        factory=list, flag="--throughput")
    profile: bool = setting(
        False, "Also profile one decode step per model at the first --seq-len, kernel by kernel (profile-*.txt).")
    kernels: bool = setting(False, "Kernel micro-benchmark: every installed mixer backend side by side.")
    repeats: int = setting(3, "Timed repeats (after one warm-up); medians are reported.")
    output: str = setting("runs/bench", "Folder for bench.json and bench.png.")
    device: Device = setting("auto", "Where the models run.")
    seed: int = 0
    trust_remote_code: bool = False

    def check(self, source: str | RecipeSource = "recipe") -> None:
        check_bench_recipe(self, source)


def check_bench_recipe(recipe: BenchRecipe, source: str | RecipeSource = "recipe") -> None:
    problems = []
    if recipe.placement not in choices(Placement):
        problems.append(f"'placement' must be one of {', '.join(choices(Placement))}, got {recipe.placement!r}")
    problems += [f"'ratios': {r} is outside (0, 1]" for r in recipe.ratios or [] if not 0 < r <= 1]
    problems += [f"'engines': unknown engine {e!r} ({' | '.join(choices(Engine))})"
                 for e in recipe.engines if e not in choices(Engine)]
    if not recipe.engines:
        problems.append("'engines' is empty")
    for key, kind in (("backend", Backend), ("dtype", Dtype)):
        if getattr(recipe, key) not in choices(kind):
            problems.append(f"'{key}' must be one of {', '.join(choices(kind))}, got {getattr(recipe, key)!r}")
    if recipe.device not in choices(Device):
        *most, last = choices(Device)
        problems.append(f"'device' must be {', '.join(most)} or {last}, got {recipe.device!r}")
    problems += [f"'seq_lens': {n} must be >= 2" for n in recipe.seq_lens if n < 2]
    problems += [f"'batches': {n} must be >= 1" for n in recipe.batches if n < 1]
    if recipe.gen_len < 2:
        problems.append(f"'gen_len' must be >= 2, got {recipe.gen_len}")
    if recipe.repeats < 1:
        problems.append(f"'repeats' must be >= 1, got {recipe.repeats}")
    problems += [f"'throughput_seq_lens': {n} must be >= 2" for n in recipe.throughput_seq_lens if n < 2]
    problems += [f"'students': {p} is not a model directory" for p in recipe.students if not (Path(p) / "config.json").is_file()]
    if problems:
        raise problems_error(problems, source)
