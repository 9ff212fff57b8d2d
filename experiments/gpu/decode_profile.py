"""Where a decode step's time goes (run on the GPU machine): attention kernel sweep, GEMV rates,
and a kernel-level profile of the teacher's graph-decoded step.

    python experiments/gpu/decode_profile.py [attention] [gemv] [steps] > docs/results/bench/decode-profile-h100.txt

It prints its report; the committed ones are docs/results/bench/attention-v1-gemv-h100.txt,
attention-sweep-h200.txt, decode-profile-h100.txt and decode-profile-teacher-h200.txt (docs/bench.md)."""

import itertools
import statistics
import sys

import torch
import torch.nn.functional as F
from decode_common import decode_inputs, graph_time, rel_err  # this folder: on the path when the script runs

from matvlm_cli.bench.floor import measure_bandwidth
from matvlm_cli.kernels import attention

dev = torch.device("cuda")
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
bw = measure_bandwidth(dev)
print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)


def attention_sweep():
    print("\n== split-KV decode attention (tensor-core kernel), caches of several layers per graph ==")
    best = {}
    shapes = (
        (1, 32, 32, 80, 8192, 16),
        (1, 32, 32, 80, 32768, 8),
        (24, 32, 32, 80, 8192, 2),
        (1, 32, 8, 128, 8192, 16),
    )
    for batch, heads, kv_heads, dim, ctx, layers in shapes:
        q, ks, vs, keep, ref = decode_inputs(batch, heads, kv_heads, dim, ctx, layers, left_pad=True)  # a left-padded row
        group = heads // kv_heads
        moved = 2 * batch * kv_heads * ctx * dim * 2
        mask4 = keep[:, None, None, :]
        tag = f"b{batch} h{heads}/{kv_heads}x{dim} ctx {ctx}"
        if group == 1:
            t = graph_time(lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask4) for k, v in zip(ks, vs)])
            print(
                f"{tag} SDPA masked: {t / layers * 1e6:.1f} us/layer, {moved / (t / layers) / 1e9:.0f} GB/s", flush=True
            )
        rows = []
        for bn, pps, nw, ns in itertools.product((32, 64, 128), (1, 2, 4, 8), (4, 8), (2, 3, 4)):
            attention.TUNING.update(block_n=bn, programs_per_sm=pps, num_warps=nw, num_stages=ns)
            try:
                out = attention.split_kv_decode(q, ks[0], vs[0], keep, dim**-0.5)
                err = rel_err(out, ref)
                t = graph_time(lambda: [attention.split_kv_decode(q, k, v, keep, dim**-0.5) for k, v in zip(ks, vs)])
            except Exception as e:  # noqa
                print("fail", bn, pps, nw, ns, type(e).__name__, str(e)[:80])
                continue
            rows.append((t / layers, bn, pps, nw, ns, err))
            best.setdefault((bn, pps, nw, ns), []).append(t / layers)
        rows.sort()
        for t, bn, pps, nw, ns, err in rows[:5] + rows[-1:]:
            print(
                f"{tag} block_n {bn:3d} programs/SM {pps} warps {nw} stages {ns}: {t * 1e6:6.1f} us/layer "
                f"{moved / t / 1e9:5.0f} GB/s err {err:.1e}"
            )
        print(f"{tag} worst error over configs {max(r[-1] for r in rows):.1e}", flush=True)
        ks = vs = None  # released (the lambdas above ran already)
        torch.cuda.empty_cache()
    # the config with the best geometric mean over the shapes
    score = {c: statistics.geometric_mean(ts) for c, ts in best.items() if len(ts) == len(shapes)}
    for c in sorted(score, key=score.get)[:5]:
        print("overall", c, [f"{t * 1e6:.1f}" for t in best[c]])
    bn, pps, nw, ns = min(score, key=score.get)
    print(f"best overall: block_n {bn} programs/SM {pps} warps {nw} stages {ns}")
    attention.TUNING.update(block_n=bn, programs_per_sm=pps, num_warps=nw, num_stages=ns)


def gemv_rates():
    print("\n== GEMV (batch 1, bf16), 32 distinct weights per graph ==")
    for n_in, n_out in (
        (2560, 2560),
        (2560, 7680),
        (2560, 10240),
        (10240, 2560),
        (2560, 17920),
        (2560, 51200),
        (4096, 4096),
        (4096, 12288),
        (11008, 4096),
    ):
        count = 32 if n_out < 20000 else 4
        ws = [torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(count)]
        bs = [torch.randn(n_out, device=dev, dtype=torch.bfloat16) for _ in range(count)]
        x = torch.randn(1, 1, n_in, device=dev, dtype=torch.bfloat16)
        t = graph_time(lambda: [F.linear(x, w, b) for w, b in zip(ws, bs)]) / count
        t2 = graph_time(lambda: [F.linear(x, w) for w in ws]) / count
        size = n_in * n_out * 2
        print(
            f"{n_in:6d} -> {n_out:6d} ({size / 1e6:5.1f} MB): bias {t * 1e6:6.1f} us {size / t / 1e9:5.0f} GB/s; "
            f"no bias {t2 * 1e6:6.1f} us {size / t2 / 1e9:5.0f} GB/s; floor {size / bw * 1e6:5.1f} us"
        )
        ws = bs = None  # released (the lambdas above ran already)


def step_profiles(contexts=(8192,)):
    from torch.profiler import ProfilerActivity, profile

    from matvlm_cli import kernels
    from matvlm_cli.bench import floor
    from matvlm_cli.bench.engines import GraphEngine
    from matvlm_cli.bench.models import bench_inputs, build_teacher, image_input
    from matvlm_cli.hybrid import choose_layers, convert_to_hybrid

    print("mixer kernels", kernels.resolved())
    for ratio in (0, 0.5):
        model = build_teacher("tinyllava-phi2-siglip-3b", dev, torch.bfloat16)
        if ratio:
            convert_to_hybrid(model, choose_layers(32, ratio=ratio, placement="even"))
        images = image_input(model)
        engine = GraphEngine(model)
        weights = floor.decode_weight_bytes(model)
        for ctx in contexts:
            inputs = bench_inputs(model, ctx, 1, images)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            torch.cuda.reset_peak_memory_stats()
            cache, first = engine.prefill(inputs, ctx + 64)
            torch.cuda.synchronize()
            after_prefill, prefill_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            advance, tokens = engine.decoder(cache, first, ctx, ctx + 64, 64)
            for _ in range(10):
                advance()
            torch.cuda.synchronize()
            decode_peak = torch.cuda.max_memory_allocated()
            from matvlm_cli.bench.engines import cache_sizes

            kv, st = cache_sizes(cache)
            g = 2**20
            print(
                f"memory MiB: params {params / g:.0f}, allocated before prefill {base / g:.0f}, prefill peak {prefill_peak / g:.0f}, "
                f"after prefill {after_prefill / g:.0f} (cache {kv / g:.0f} + state {st / g:.0f}), decode peak {decode_peak / g:.0f}"
            )
            cache = advance = None  # released (the lambdas above ran already)
            torch.cuda.empty_cache()
            timing = engine.run(inputs, 64, repeats=2)
            fl = floor.floor_ms(floor.floor_bytes(weights, floor.kv_bytes(model, ctx), timing.state_bytes), bw)
            print(
                f"\n== ratio {ratio} ctx {ctx}: {timing.decode_ms_per_token:.2f} ms/token, floor {fl:.2f} ms, "
                f"x{timing.decode_ms_per_token / fl:.2f}, peak {timing.peak_bytes / 2**30:.2f} GiB"
            )
            cache, first = engine.prefill(inputs, ctx + 64)
            advance, tokens = engine.decoder(cache, first, ctx, ctx + 64, 64)
            torch.cuda.synchronize()
            steps = 20
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    advance()
                torch.cuda.synchronize()
            events = [e for e in prof.events() if e.device_type.name == "CUDA"]
            total = sum(e.device_time for e in events) / steps
            print(f"kernels per step {len(events) / steps:.0f}, summed kernel time {total / 1000:.2f} ms per step")
            by = {}
            for e in events:
                name = e.name[:90]
                c, t = by.get(name, (0, 0.0))
                by[name] = (c + 1, t + e.device_time)
            for name, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:24]:
                print(f"{t / steps / 1000:7.3f} ms {c / steps:5.0f}x {t / c:7.1f} us  {name}")
            cache = advance = None  # released (the lambdas above ran already)
            torch.cuda.empty_cache()
        model = engine = None  # released (the lambdas above ran already)
        torch.cuda.empty_cache()


parts = sys.argv[1:] or ["attention", "gemv", "steps"]
if "attention" in parts:
    attention_sweep()
if "gemv" in parts:
    gemv_rates()
if "steps" in parts:
    step_profiles()
