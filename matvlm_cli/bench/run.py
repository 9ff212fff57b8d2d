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

from .. import kernels
from ..atomic import check_output_dir
from ..errors import MatvlmError
from ..hybrid.checks import resolve_device
from ..hybrid.conversion import hybrid_layers
from ..recipes import BenchRecipe, check_bench_recipe
from . import floor
from . import throughput as throughput_search
from .engines import ENGINES, GraphEngine, Timing
from .models import bench_inputs, check_memory, check_models, check_teacher, default_teacher, image_input, model_specs
from .profile import profile_decode
from .report import save_report, write_report


@dataclass
class BenchRow:
    """One model, engine, context length and batch size."""

    model: str
    mamba_layers: int
    engine: str
    seq_len: int
    batch: int
    gen_len: int
    prefill_ms: float | None = None  # median of prefill_runs_ms
    prefill_runs_ms: list[float] | None = None  # each attempt's prefill: an eager prefill waits on the host, whose pace varies
    decode_ms: float | None = None  # per step (every sequence of the batch gains one token)
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    kv_cache_bytes: int | None = None  # allocated (static caches hold seq_len + gen_len slots)
    state_bytes: int | None = None
    floor_ms: float | None = None  # bytes a step must move / measured bandwidth
    x_floor: float | None = None
    error: str | None = None  # e.g. "out of memory"


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
    row.prefill_runs_ms = [round(ms, 2) for ms in timing.prefill_runs_ms]
    row.tokens_per_s = batch * 1000 / timing.decode_ms_per_token
    row.peak_gib = None if timing.peak_bytes is None else timing.peak_bytes / 2**30
    row.kv_cache_bytes, row.state_bytes = timing.kv_bytes, state
    row.floor_ms = floor.floor_ms(moved, bandwidth)
    row.x_floor = timing.decode_ms_per_token / row.floor_ms
    return row


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
        return write_report(report, recipe.output, console)

    teacher = recipe.teacher or default_teacher(device)
    check_teacher(teacher)
    lengths = [n + recipe.gen_len for n in recipe.seq_lens]
    throughput_lengths = recipe.throughput_seq_lens if device.type == "cuda" else []
    if recipe.throughput_seq_lens and device.type != "cuda":
        console.print("--throughput: the largest-batch search needs a GPU; skipped on the CPU")
    lengths += [n + throughput_search.GEN_LEN for n in throughput_lengths]
    check_models(teacher, recipe.students, lengths, recipe.trust_remote_code)
    check_memory(teacher, recipe.students, device, dtype, recipe.trust_remote_code)
    ratios = recipe.ratios if recipe.ratios is not None else ([] if recipe.students else [0.25, 0.5])
    specs = model_specs(teacher, recipe.students, ratios, recipe.placement, device, dtype, recipe.seed, recipe.trust_remote_code)
    report["teacher"] = teacher
    bandwidth = floor.measure_bandwidth(device)
    report["bandwidth_gb_s"] = bandwidth / 1e9
    console.print(f"measured bandwidth {bandwidth / 1e9:.0f} GB/s (device-to-device copy)")

    rows: list[BenchRow] = []
    throughput: list[throughput_search.ThroughputRow] = []
    profiles: list[dict] = []
    report.update(rows=[], throughput=[], profiles=profiles)
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
            if (recipe.profile or throughput_lengths) and "graphs" not in engines:
                engines["graphs"] = GraphEngine(model)
            if recipe.profile:
                progress.update(task, description=f"{spec.label} · profiling a decode step")
                inputs = bench_inputs(model, recipe.seq_lens[0], recipe.batches[0], image, recipe.seed)
                entry = {"model": spec.label, **profile_decode(engines["graphs"], inputs)}
                timed = [r for r in rows if (r.model, r.engine, r.seq_len, r.batch) == (spec.label, "graphs", entry["seq_len"], entry["batch"])]
                entry["step_ms"] = timed[0].decode_ms if timed else None
                entry["file"] = f"profile-{spec.label}-{entry['seq_len']}.txt"
                profiles.append(entry)
                del inputs
                _free(device)
            for seq_len in throughput_lengths:
                progress.update(task, description=f"{spec.label} · largest batch at {seq_len} tokens")
                one = bench_inputs(model, seq_len, 1, image, recipe.seed)
                throughput.append(throughput_search.largest_batch(engines["graphs"], spec.label, one, seq_len, device))
                del one
            del model, engines
            _free(device)
            report.update(rows=[asdict(row) for row in rows], throughput=[asdict(row) for row in throughput])
            save_report(report, recipe.output)
    return write_report(report, recipe.output, console)
