"""What the decode experiments (decode_profile.py, decode_kernels.py) share: timing a GPU callable as the
graphs engine runs it (captured once as a CUDA graph, then replayed), and decode-attention inputs with
float32 SDPA's answer."""

import statistics

import torch
import torch.nn.functional as F


def graph_time(fn, reps=20):
    """median seconds per graph replay of fn()"""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)


def decode_inputs(batch, heads, kv_heads, dim, ctx, layers, left_pad=False, device="cuda"):
    """One query and `layers` distinct bf16 caches of ctx + 128 slots (ctx filled; with left_pad, the first
    row's first 5 slots masked), and float32 SDPA's answer for the first cache."""
    slots = ctx + 128
    ks = [torch.randn(batch, kv_heads, slots, dim, device=device, dtype=torch.bfloat16) for _ in range(layers)]
    vs = [torch.randn_like(k) for k in ks]
    q = torch.randn(batch, heads, 1, dim, device=device, dtype=torch.bfloat16)
    keep = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    keep[:, :ctx] = True
    if left_pad:
        keep[0, :5] = False
    group = heads // kv_heads
    kr = ks[0][:, :, :ctx].float().repeat_interleave(group, 1)
    vr = vs[0][:, :, :ctx].float().repeat_interleave(group, 1)
    mask = keep[:, None, None, :ctx] if left_pad else None
    ref = F.scaled_dot_product_attention(q.float(), kr, vr, attn_mask=mask).transpose(1, 2)
    return q, ks, vs, keep, ref


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()
