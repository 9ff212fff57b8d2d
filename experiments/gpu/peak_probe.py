"""Why a hybrid's bench peak exceeds weights + cache + prefill transient: memory at each attempt.

    python experiments/gpu/peak_probe.py > docs/results/bench/peak-probe-h100.txt      (GPU machine)

It prints its report; the committed one is docs/results/bench/peak-probe-h100.txt (docs/bench.md)."""

import gc

import torch
from torch._dynamo.utils import counters

from matvlm_cli.bench.engines import GraphEngine
from matvlm_cli.bench.models import bench_inputs, build_teacher, image_input
from matvlm_cli.hybrid import choose_layers, convert_to_hybrid

dev = torch.device("cuda")
original = GraphEngine.prefill


def prefill(self, inputs, max_len):
    if COLLECT:
        gc.collect()
    print(
        f"  prefill starts with {torch.cuda.memory_allocated() / 2**20:.0f} MiB allocated, graphs compiled so far "
        f"{counters['stats']['unique_graphs']}",
        flush=True,
    )
    return original(self, inputs, max_len)


GraphEngine.prefill = prefill
for ratio in (0, 0.5):
    for COLLECT in (False, True):
        model = build_teacher("tinyllava-phi2-siglip-3b", dev, torch.bfloat16)
        if ratio:
            convert_to_hybrid(model, choose_layers(32, ratio=ratio, placement="even"))
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        engine = GraphEngine(model)
        timing = engine.run(bench_inputs(model, 16384, 1, image_input(model)), 32, repeats=2)
        print(
            f"ratio {ratio} gc {COLLECT}: peak {timing.peak_bytes / 2**20:.0f} MiB = params {params / 2**20:.0f} + cache "
            f"{(timing.kv_bytes + timing.state_bytes) / 2**20:.0f} + {(timing.peak_bytes - params - timing.kv_bytes - timing.state_bytes) / 2**20:.0f}; "
            f"{timing.decode_ms_per_token:.2f} ms/token",
            flush=True,
        )
        del model, engine, timing
        gc.collect()
        torch.cuda.empty_cache()
