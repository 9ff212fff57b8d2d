"""`matvlm bench`: build each model in turn, time it with each engine, write the report."""

from __future__ import annotations

import datetime
import gc
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import MatvlmError
from ..hybrid import kernels
from ..hybrid.conversion import hybrid_layers
from ..hybrid.io import check_output_dir, resolve_device
from ..recipes import BenchRecipe, check_bench_recipe
from . import floor
from .engines import ENGINES, GraphEngine, Timing
from .models import bench_inputs, check_memory, check_models, check_teacher, default_teacher, image_input, model_specs

THROUGHPUT_GEN_LEN = 32  # tokens decoded per attempt of the largest-batch search


@dataclass
class BenchRow:
    """One model, engine, context length and batch size."""

    model: str
    mamba_layers: int
    engine: str
    seq_len: int
    batch: int
    gen_len: int
    prefill_ms: float | None = None
    decode_ms: float | None = None  # per step (every sequence of the batch gains one token)
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    kv_cache_bytes: int | None = None  # allocated (static caches hold seq_len + gen_len slots)
    state_bytes: int | None = None
    floor_ms: float | None = None  # bytes a step must move / measured bandwidth
    x_floor: float | None = None
    error: str | None = None  # e.g. "out of memory"


@dataclass
class ThroughputRow:
    model: str
    seq_len: int
    max_batch: int
    decode_ms: float
    tokens_per_s: float
    peak_gib: float


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(model, label: str, engine, seq_len: int, batch: int, recipe: BenchRecipe, image,
                bandwidth: float) -> BenchRow:
    row = BenchRow(label, len(hybrid_layers(model)), engine.name, seq_len, batch, recipe.gen_len)
    inputs = bench_inputs(model, seq_len, batch, image, recipe.seed)
    try:
        timing: Timing = engine.run(inputs, recipe.gen_len, repeats=recipe.repeats)
    except torch.cuda.OutOfMemoryError:
        row.error = "out of memory"
        return row
    finally:
        del inputs
    state = timing.state_bytes
    moved = floor.floor_bytes(floor.decode_weight_bytes(model, batch), floor.kv_bytes(model, seq_len, batch), state)
    row.prefill_ms, row.decode_ms = timing.prefill_ms, timing.decode_ms_per_token
    row.tokens_per_s = batch * 1000 / timing.decode_ms_per_token
    row.peak_gib = None if timing.peak_bytes is None else timing.peak_bytes / 2**30
    row.kv_cache_bytes, row.state_bytes = timing.kv_bytes, state
    row.floor_ms = floor.floor_ms(moved, bandwidth)
    row.x_floor = timing.decode_ms_per_token / row.floor_ms
    return row


@torch.no_grad()
def largest_batch(engine: GraphEngine, label: str, recipe: BenchRecipe, image, device: torch.device) -> ThroughputRow | None:
    """The largest batch whose chunked prefill and graph decoding fit at `throughput_seq_len`, and its
    decode tokens/s. Memory per sequence is measured at batches 1 and 2, then the estimate is tried
    and lowered by 10 % until it fits."""
    seq_len, gen_len = recipe.throughput_seq_len, THROUGHPUT_GEN_LEN
    model = engine.model

    def attempt(batch: int):
        inputs = bench_inputs(model, seq_len, batch, image, recipe.seed)
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
        cache, first = engine.prefill(inputs, seq_len + gen_len)
        advance, _ = engine.decoder(cache, first, seq_len, seq_len + gen_len, gen_len, inputs.position_offsets)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(gen_len - 1):
            advance()
        end.record()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del cache, advance, inputs
        return start.elapsed_time(end) / (gen_len - 1), peak

    _, peak1 = attempt(1)
    _, peak2 = attempt(2)
    per_sequence = max(peak2 - peak1, 1)
    free, _ = torch.cuda.mem_get_info(device)
    capacity = free + torch.cuda.memory_reserved(device) - 1.5 * 2**30  # room for graphs and the allocator
    batch = max(1, int((capacity - (peak1 - per_sequence)) / per_sequence))
    for _ in range(6):
        try:
            ms, peak = attempt(batch)
            return ThroughputRow(label, seq_len, batch, ms, batch * 1000 / ms, peak / 2**30)
        except torch.cuda.OutOfMemoryError:
            _free(device)
            batch = max(1, int(batch * 0.9))
    return None


def run_bench(recipe: BenchRecipe, console: Console | None = None) -> Path:
    console = console or Console()
    check_bench_recipe(recipe)
    check_output_dir(recipe.output, "--output", exists_ok=True)  # bench.json is added to an existing folder
    device = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.dtype, device)
    try:
        kernels.set_backend(recipe.backend)
    except ValueError as err:
        raise MatvlmError(f"backend: {err}") from None
    started = datetime.datetime.now(datetime.timezone.utc)
    gpu = device_name(device)
    console.print(f"[bold]device[/bold] {gpu} · dtype {str(dtype).removeprefix('torch.')} · mixer kernels {kernels.resolved()}")
    report = {
        "device": gpu, "device_type": device.type, "date": started.isoformat(timespec="seconds"),
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "kernels": kernels.resolved(),
        "recipe": asdict(recipe),
    }

    if recipe.kernels:
        if device.type != "cuda":
            raise MatvlmError("--kernels: the kernel micro-benchmark needs a GPU")
        from .kernel_bench import kernel_rows

        report["kernel_rows"] = [asdict(row) for row in kernel_rows()]
        from .report import write_report

        return write_report(report, recipe.output, console)

    teacher = recipe.teacher or default_teacher(device)
    check_teacher(teacher)
    lengths = [n + recipe.gen_len for n in recipe.seq_lens]
    if recipe.throughput_seq_len and device.type == "cuda":
        lengths.append(recipe.throughput_seq_len + THROUGHPUT_GEN_LEN)
    check_models(teacher, recipe.students, lengths, recipe.trust_remote_code)
    check_memory(teacher, recipe.students, device, dtype, recipe.trust_remote_code)
    ratios = recipe.ratios if recipe.ratios is not None else ([] if recipe.students else [0.25, 0.5])
    specs = model_specs(teacher, recipe.students, ratios, recipe.placement, device, dtype, recipe.seed, recipe.trust_remote_code)
    report["teacher"] = teacher
    bandwidth = floor.measure_bandwidth(device)
    report["bandwidth_gb_s"] = bandwidth / 1e9
    console.print(f"measured bandwidth {bandwidth / 1e9:.0f} GB/s (device-to-device copy)")

    rows: list[BenchRow] = []
    throughput: list[ThroughputRow] = []
    total = len(specs) * len(recipe.engines) * len(recipe.seq_lens) * len(recipe.batches)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("bench", total=total)
        for spec in specs:
            progress.update(task, description=f"building {spec.label}")
            model = spec.build()
            image = image_input(model, spec.directory)
            engines = {name: ENGINES[name](model) for name in recipe.engines}
            for engine_name, engine in engines.items():
                for seq_len in recipe.seq_lens:
                    for batch in recipe.batches:
                        progress.update(task, description=f"{spec.label} · {engine_name} · {seq_len} tokens · batch {batch}")
                        rows.append(measure_row(model, spec.label, engine, seq_len, batch, recipe, image, bandwidth))
                        progress.advance(task)
                        _free(device)
            if recipe.throughput_seq_len and device.type == "cuda":
                progress.update(task, description=f"{spec.label} · largest batch at {recipe.throughput_seq_len} tokens")
                found = largest_batch(engines.get("graphs") or GraphEngine(model), spec.label, recipe, image, device)
                if found:
                    throughput.append(found)
            del model, engines
            _free(device)
    report["rows"] = [asdict(row) for row in rows]
    report["throughput"] = [asdict(row) for row in throughput]
    from .report import write_report

    return write_report(report, recipe.output, console)
