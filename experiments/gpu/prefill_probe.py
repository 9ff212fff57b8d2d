"""Prefill of the teacher and its hybrids through the `graphs` engine: time at several context lengths,
what each change made of it, and where one prefill's time goes (run on the GPU machine; `--tiny` runs
the same code on the CPU with the embedded teacher).

- `lengths`: median prefill ms (one warm-up, then `--repeats`), each model at each length.
- `variants` at `--ab-length`: the engine as it is, and with one thing undone or changed at a time:
  masked SDPA over every slot of the static cache (before the filled-slot attention), fla's conv on
  channels-first input (before the copy to channels-last), the skip, gate and norm as PyTorch ops
  (before `norm_kernel.py`), the model's own tanh GELU module (before `bench/folds.py` ran it as one
  F.gelu), and larger prefill chunks.
- `stock`: the teacher's prompt as stock transformers prefills it for `generate(cache_implementation=
  "static")`: one forward, SDPA, unfused projections.
- `agreement`: the last attention layer's cached keys and the first token, engine against the masked path.
- `profile`: the CUDA kernels of one prefill at `--ab-length`, summed by name, against its wall time
  (a sum far below the wall time means the GPU waited for Python).

    python experiments/gpu/prefill_probe.py --output docs/results/bench/prefill-h200.json   (GPU machine;
        experiments/gpu/h200_bench.sh runs it; --tiny on the CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from matvlm_cli import kernels
from matvlm_cli.bench import fusion
from matvlm_cli.bench.engines import GraphEngine
from matvlm_cli.bench.models import bench_inputs, image_input, model_specs
from matvlm_cli.kernels import attention

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
parser.add_argument("--ab-length", type=int, default=8192)
parser.add_argument("--chunks", type=int, nargs="*", default=[2048, 4096], help="prefill chunk sizes to compare with the default")
parser.add_argument("--models", nargs="+", help="labels to measure, in this order (teacher, hybrid-0.25, ...); default all")
parser.add_argument("--no-stock", action="store_true", help="skip stock transformers' prefill of the teacher")
parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--tiny", action="store_true", help="the embedded teacher on the CPU, short lengths")
parser.add_argument("--output", type=Path, required=True)
args = parser.parse_args()

device = torch.device("cpu" if args.tiny else "cuda")
dtype = torch.float32 if args.tiny else torch.bfloat16
if args.tiny:
    from matvlm_cli.paths import default_teacher_dir

    teacher = str(default_teacher_dir())
    args.lengths, args.ab_length, args.chunks = [96, 200], 200, [128]
else:
    teacher = "tinyllava-phi2-siglip-3b"


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn) -> float:
    times = []
    for attempt in range(1 + args.repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if attempt:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Undone:
    """Context managers that put one earlier behaviour back for the length of a measurement."""

    @staticmethod
    def masked_attention():
        original = attention._can_cut_prefill
        attention._can_cut_prefill = lambda *a, **k: False
        return lambda: setattr(attention, "_can_cut_prefill", original)

    @staticmethod
    def channels_first_conv():
        ops = kernels.backend_ops("fla")
        from fla.modules.causal_conv1d import causal_conv1d as fla_conv

        original = ops.conv1d

        def conv1d(x, weight, bias, activation="silu"):
            y, _ = fla_conv(x.transpose(1, 2), weight, bias, activation=activation)
            return y.transpose(1, 2)

        ops.conv1d = conv1d
        return lambda: setattr(ops, "conv1d", original)

    @staticmethod
    def module_gelu():
        from matvlm_cli.bench.folds import ActivationAfterProjection

        original = ActivationAfterProjection.forward
        ActivationAfterProjection.forward = lambda self, x: x if self.projection[0].gelu_applied else self.activation(x)
        return lambda: setattr(ActivationAfterProjection, "forward", original)

    @staticmethod
    def pytorch_norm():
        ops = kernels.backend_ops("triton")
        original, ops.skip_gate_norm = ops.skip_gate_norm, None
        return lambda: setattr(ops, "skip_gate_norm", original)


report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
          "date": time.strftime("%Y-%m-%d"), "kernels": kernels.resolved(), "teacher": teacher,
          "lengths": [], "variants": [], "stock": [], "agreement": [], "profile": []}
print(report["device"], report["torch"], report["kernels"], flush=True)

specs = model_specs(teacher, [], args.ratios, "even", device, dtype)
if args.models:  # in the order given
    specs = [spec for label in args.models for spec in specs if spec.label == label]
for spec in specs:
    model = spec.build()
    image = image_input(model, spec.directory)
    # prefill is never compiled (compile=False only skips compiling the decode step); the tiny run uses small
    # chunks so that its prompts take several
    engine = GraphEngine(model, compile=False, **({"prefill_chunk": 64} if args.tiny else {}))
    default_chunk = engine.prefill_chunk
    for length in args.lengths:
        inputs = bench_inputs(model, length, 1, image)
        try:
            ms = median_ms(lambda: engine.prefill(inputs, length + 128))
        except torch.cuda.OutOfMemoryError:
            ms = None
        report["lengths"].append({"model": spec.label, "seq_len": length, "prefill_ms": ms, "chunk": default_chunk})
        print(f"{spec.label:12s} prefill {length:6d} tokens: {ms:9.1f} ms" if ms else f"{spec.label} {length}: out of memory", flush=True)
        inputs = None  # released (the lambdas above ran already)
        torch.cuda.empty_cache() if device.type == "cuda" else None

    length = args.ab_length
    inputs = bench_inputs(model, length, 1, image)
    max_len = length + 128
    variants = [("engine as it is", None, default_chunk), ("masked SDPA over every slot", Undone.masked_attention, default_chunk)]
    if any(type(m).__name__ == "ActivationAfterProjection" for m in model.modules()):
        variants.append(("the model's own tanh GELU module", Undone.module_gelu, default_chunk))
    if spec.label != "teacher" and report["kernels"].get("conv1d") == "fla":
        variants.append(("fla conv on channels-first input", Undone.channels_first_conv, default_chunk))
    if spec.label != "teacher" and report["kernels"].get("skip_gate_norm") == "triton":
        variants.append(("skip, gate and norm in PyTorch", Undone.pytorch_norm, default_chunk))
    variants += [(f"chunks of {chunk}", None, chunk) for chunk in args.chunks]
    engine_first = None
    for name, undo, chunk in variants:
        restore = undo() if undo else None
        engine.prefill_chunk = chunk
        try:
            ms = median_ms(lambda: engine.prefill(inputs, max_len))
            first = engine.prefill(inputs, max_len)[1]
            engine_first = first if engine_first is None else engine_first
        finally:
            engine.prefill_chunk = default_chunk
            if restore:
                restore()
        same = bool(torch.equal(first, engine_first))
        report["variants"].append({"model": spec.label, "seq_len": length, "variant": name, "chunk": chunk, "prefill_ms": ms,
                                   "same_first_token": same})
        print(f"{spec.label:12s} {length} tokens, {name:36s}: {ms:8.1f} ms{'' if same else '  (another first token)'}", flush=True)

    # the filled-slot attention computes what the masked path computes
    new_cache, new_first = engine.prefill(inputs, max_len)
    restore = Undone.masked_attention()
    old_cache, old_first = engine.prefill(inputs, max_len)
    restore()
    keys, old_keys = ([layer.keys for layer in c.layers if isinstance(getattr(layer, "keys", None), torch.Tensor)]
                      for c in (new_cache, old_cache))
    agreement = {"model": spec.label, "seq_len": length, "last_keys_rel_err": rel_err(keys[-1][..., :length, :], old_keys[-1][..., :length, :]),
                 "same_first_token": bool(torch.equal(new_first, old_first))}
    report["agreement"].append(agreement)
    print(f"{spec.label:12s} filled-slot vs masked attention: last layer's keys rel. err {agreement['last_keys_rel_err']:.1e}, "
          f"same first token {agreement['same_first_token']}", flush=True)
    new_cache = old_cache = None  # released (the lambdas above ran already)

    if spec.label == "teacher" and not args.no_stock:  # stock transformers: one forward, SDPA (flash), q/k/v unfused
        def stock():
            fusion.unfuse(model)
            engine.text_config._attn_implementation = "sdpa"
            cache = engine.new_cache(max_len)
            positions = torch.arange(length, device=device)
            out = engine.forward(cache, input_ids=inputs.input_ids, position_ids=positions[None], cache_position=positions,
                                 logits_to_keep=1, **inputs.model_inputs())
            return out.logits[:, -1].argmax(-1)

        ms = median_ms(stock)
        report["stock"].append({"model": spec.label, "seq_len": length, "prefill_ms": ms})
        print(f"{spec.label:12s} {length} tokens, stock transformers (one forward, SDPA): {ms:8.1f} ms", flush=True)

    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        wall = median_ms(lambda: engine.prefill(inputs, max_len))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.prefill(inputs, max_len)
            sync()
        totals: dict[str, list[float]] = {}
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                entry = totals.setdefault(event.name, [0, 0.0])
                entry[0] += 1
                entry[1] += event.device_time / 1000
        top = sorted(totals.items(), key=lambda kv: -kv[1][1])[:25]
        kernel_ms = sum(t for _, t in totals.values())
        report["profile"].append({"model": spec.label, "seq_len": length, "wall_ms": wall, "kernel_ms": kernel_ms,
                                  "kernels": sum(c for c, _ in totals.values()),
                                  "top": [{"name": n[:120], "calls": c, "ms": t} for n, (c, t) in top]})
        print(f"\n{spec.label}: one {length}-token prefill: {wall:.1f} ms wall, {kernel_ms:.1f} ms of kernels "
              f"({sum(c for c, _ in totals.values())} kernels)")
        for name, (calls, ms) in top:
            print(f"  {ms:8.2f} ms {calls:5d}x  {name[:100]}")
        print(flush=True)
    model = engine = inputs = None  # released (the lambdas above ran already)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    args.output.write_text(json.dumps(report, indent=2) + "\n")  # after each model: a run cut short keeps what it measured
    print(f"wrote {args.output}", flush=True)
