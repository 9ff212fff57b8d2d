"""`bench --profile`: where one decode step's time goes, kernel by kernel.

The step is the one the `graphs` engine times: a replayed CUDA graph. torch.profiler sees the kernels
inside a graph replay, so each kernel's time and how often it runs per step come straight from the
replays. Dividing the count by the decoder's layers says which kernels run once per layer (or per
attention or Mamba layer) and which once per step. On a CPU the step runs eagerly and the table lists
PyTorch ops by their own CPU time instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..hybrid.conversion import hybrid_layers
from .engines import GraphEngine

STEPS = 20  # graph replays profiled
TOP = 40  # kernels kept in the report


@dataclass
class KernelTime:
    name: str
    ms_per_step: float
    calls_per_step: float
    us_per_call: float


@torch.no_grad()
def profile_decode(engine: GraphEngine, inputs, steps: int = STEPS) -> dict:
    """Prefill `inputs`, then profile `steps` decode steps; returns the summary and the kernels, costliest
    first."""
    model = engine.model
    length = inputs.input_ids.shape[1]
    gen_len = steps + 2  # one step outside the profile, `steps` inside, room for the token they write
    max_len = length + gen_len
    cache, first = engine.prefill(inputs, max_len)
    advance, _ = engine.decoder(cache, first, length, max_len, gen_len, inputs.position_offsets)
    on_gpu = engine.device.type == "cuda"
    advance()
    if on_gpu:
        torch.cuda.synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            advance()
        if on_gpu:
            torch.cuda.synchronize(engine.device)
    totals: dict[str, list[float]] = {}
    if on_gpu:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                entry = totals.setdefault(event.name, [0, 0.0])
                entry[0] += 1
                entry[1] += event.device_time
    else:
        for average in prof.key_averages():
            if average.self_cpu_time_total > 0:
                totals[average.key] = [average.count, average.self_cpu_time_total]
    kernels = sorted(
        (KernelTime(name, total / steps / 1000, count / steps, total / count) for name, (count, total) in totals.items()),
        key=lambda k: -k.ms_per_step,
    )
    text_config = model.config.get_text_config(decoder=True)
    return {
        "seq_len": length, "batch": inputs.input_ids.shape[0], "steps": steps,
        "layers": text_config.num_hidden_layers, "mamba_layers": len(hybrid_layers(model)),
        "unit": "CUDA kernels in graph replays" if on_gpu else "PyTorch ops, own CPU time (eager step)",
        "kernels_per_step": sum(k.calls_per_step for k in kernels),
        "kernel_ms_per_step": sum(k.ms_per_step for k in kernels),
        "kernels": [vars(k) for k in kernels[:TOP]],
    }


def profile_table(entry: dict) -> str:
    """The text file a profile is written as: a header, then one kernel a line."""
    layers, mamba = entry["layers"], entry["mamba_layers"]
    lines = [
        f"{entry['model']}: one decode step at {entry['seq_len']} tokens, batch {entry['batch']}, "
        f"{layers} layers ({layers - mamba} attention, {mamba} Mamba); {entry['unit']}, mean of {entry['steps']} steps",
        f"{entry['kernels_per_step']:.0f} kernels per step, {entry['kernel_ms_per_step']:.3f} ms of kernels per step"
        + (f"; the step takes {entry['step_ms']:.3f} ms" if entry.get("step_ms") else ""),
        "",
        f"{'ms/step':>8} {'calls/step':>10} {'per layer':>9} {'us/call':>8}  kernel",
    ]
    for k in entry["kernels"]:
        lines.append(f"{k['ms_per_step']:8.3f} {k['calls_per_step']:10.1f} {k['calls_per_step'] / layers:9.2f} "
                     f"{k['us_per_call']:8.1f}  {k['name'][:110]}")
    return "\n".join(lines) + "\n"
