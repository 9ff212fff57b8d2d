"""Why `matvlm bench` times an 8k prefill slower and noisier than `prefill_probe.py` (session 23, H100: the
teacher 148.7 and 160.0 ms in two bench calls, 134.9 ms in the probe). The same GraphEngine, one model, in
one process, prefill timed three ways:

- `alone`: prefills back to back, as the probe times them (the decode step not compiled);
- `compiled`: the same after the decode step is compiled, as the bench's engine is;
- `in run`: as `GraphEngine.run` interleaves them, each prefill after the last attempt's graph capture and
  decode, its cache and graph dropped.

For each prefill: ms, and the CUDA caching allocator's new device allocations (cudaMalloc) and retries (a
retry frees cached blocks and synchronises) during it.

    python experiments/gpu/prefill_in_bench.py --models teacher hybrid-0.5 --seq-len 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from matvlm_cli.bench.engines import GraphEngine
from matvlm_cli.bench.models import bench_inputs, image_input, model_specs

parser = argparse.ArgumentParser()
parser.add_argument("--models", nargs="+", default=["teacher", "hybrid-0.5"])
parser.add_argument("--seq-len", type=int, default=8192)
parser.add_argument("--repeats", type=int, default=4)
parser.add_argument("--gen-len", type=int, default=128)
parser.add_argument("--tiny", action="store_true", help="the embedded teacher on the CPU (the decode step not compiled)")
parser.add_argument("--output")
args = parser.parse_args()
device = torch.device("cpu" if args.tiny else "cuda")
dtype = torch.float32 if args.tiny else torch.bfloat16
if args.tiny:
    from matvlm_cli.paths import default_teacher_dir

    teacher, args.seq_len, args.gen_len = str(default_teacher_dir()), 96, 4
else:
    teacher = "tinyllava-phi2-siglip-3b"


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocator() -> tuple[int, int]:
    stats = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
    return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)


def timed_prefill(engine, inputs, max_len):
    sync()
    before = allocator()
    start = time.perf_counter()
    cache, first = engine.prefill(inputs, max_len)
    sync()
    ms = (time.perf_counter() - start) * 1000
    after = allocator()
    return cache, first, {"ms": round(ms, 2), "cudaMalloc": after[0] - before[0], "retries": after[1] - before[1]}


report = []
for spec in [s for label in args.models for s in model_specs(teacher, [], [0.25, 0.5], "even", device, dtype) if s.label == label]:
    model = spec.build()
    inputs = bench_inputs(model, args.seq_len, 1, image_input(model, spec.directory))
    max_len = args.seq_len + args.gen_len
    engine = GraphEngine(model, compile=False)
    ways = {"alone": [], "compiled": [], "in run": []}
    for _ in range(args.repeats + 1):
        cache, _, t = timed_prefill(engine, inputs, max_len)
        ways["alone"].append(t)
        del cache
    if device.type == "cuda":
        engine.compile_step()
    for _ in range(args.repeats + 1):
        cache, _, t = timed_prefill(engine, inputs, max_len)
        ways["compiled"].append(t)
        del cache
    for _ in range(args.repeats + 1):  # GraphEngine.run's loop
        cache, first, t = timed_prefill(engine, inputs, max_len)
        ways["in run"].append(t)
        advance, _ = engine.decoder(cache, first, args.seq_len, max_len, args.gen_len, inputs.position_offsets)
        for _ in range(args.gen_len - 1):
            advance()
        sync()
        del cache, advance
    for way, runs in ways.items():
        median = statistics.median(r["ms"] for r in runs[1:])
        print(f"{spec.label:12} {way:9} median {median:7.1f} ms  runs {[r['ms'] for r in runs]}  "
              f"cudaMalloc {[r['cudaMalloc'] for r in runs]}  retries {[r['retries'] for r in runs]}", flush=True)
        report.append({"model": spec.label, "way": way, "median_ms": median, "runs": runs})
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
if args.output:
    with open(args.output, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "seq_len": args.seq_len, "rows": report}, f, indent=1)
