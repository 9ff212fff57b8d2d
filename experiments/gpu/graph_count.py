"""Compile cost, graph count and decode speed of one graph-decoded step, 0.25 hybrid (TinyLLaVA shape).
OLD=1 restores functools.cache around backend loading (the session-3 code) for comparison.

    python experiments/gpu/graph_count.py [SEQ_LEN]     (GPU machine, fla importable)

It prints its report; the committed one is docs/results/bench/graph-count-h100.txt (docs/bench.md).
"""

import functools
import os
import sys
import time

import torch
from torch._dynamo.utils import counters

from matvlm_cli import kernels
from matvlm_cli.bench.engines import GraphEngine
from matvlm_cli.bench.models import bench_inputs, image_input, model_specs

if os.environ.get("OLD"):
    kernels.backend_ops = functools.cache(kernels._load)
t0 = time.time()


def log(*a):
    print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)


seq = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
log("kernels:", kernels.resolved(), "OLD" if os.environ.get("OLD") else "NEW")
for spec in model_specs("tinyllava-phi2-siglip-3b", [], [0.25], "even", torch.device("cuda"), torch.bfloat16)[1:]:
    model = spec.build()
    counters.clear()
    engine = GraphEngine(model)
    inputs = bench_inputs(model, seq, 1, image_input(model))
    cache, first = engine.prefill(inputs, seq + 64)
    torch.cuda.synchronize()
    log(spec.label, "prefilled")
    advance, tokens = engine.decoder(cache, first, seq, seq + 64, 64)
    torch.cuda.synchronize()
    log(spec.label, "compiled + captured")
    breaks = sum(counters["graph_break"].values())
    log(
        f"{spec.label}: {counters['stats']['unique_graphs']} graphs, {breaks} graph breaks",
        dict(counters["graph_break"]),
    )
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(63):
        advance()
    end.record()
    torch.cuda.synchronize()
    log(f"{spec.label}: {start.elapsed_time(end) / 63:.3f} ms/token at {seq}")
