"""`matvlm bench --kernels`: every installed mixer backend side by side on one Mamba-2 layer's work.

Each op runs on the same random inputs per backend; its time (CUDA events, median) and its relative
error against the float32 PyTorch reference are reported. The shape is the converted Phi-2 layer of
the paper's teacher (32 heads of 80, d_state 80, 32 groups) unless given. Decoding attention over an
8k static cache (SDPA with a mask vs the split-KV kernel the `graphs` engine uses) is timed alongside.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..hybrid.ssd import causal_conv1d, causal_conv1d_step, ssd_chunk_scan, ssd_step


@dataclass
class KernelRow:
    op: str
    backend: str
    ms: float
    rel_error: float | None  # vs the float32 reference; None for the reference itself


def _time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def kernel_rows(length: int = 8192, heads: int = 32, headdim: int = 80, d_state: int = 80, groups: int = 32,
                chunk_size: int = 128, batch: int = 1) -> list[KernelRow]:
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=g) * scale

    x = randn(batch, length, heads, headdim).bfloat16()
    dt = F.softplus(randn(batch, length, heads) - 2)
    A = -torch.rand(heads, device=device, generator=g) * 4 - 0.5
    B = randn(batch, length, groups, d_state, scale=d_state**-0.5).bfloat16()
    C = randn(batch, length, groups, d_state, scale=d_state**-0.5).bfloat16()
    D = randn(heads)
    channels = heads * headdim + 2 * groups * d_state
    conv_in = randn(batch, channels, length).bfloat16()
    weight, bias = randn(channels, 4).bfloat16(), randn(channels).bfloat16()
    state0 = randn(batch, heads, headdim, d_state)
    conv_state0 = randn(batch, channels, 4).bfloat16()

    kernels.set_backend("torch")
    ref_y, ref_final = ssd_chunk_scan(x.float(), dt, A, B.float(), C.float(), chunk_size, D=D)
    ref_conv = causal_conv1d(conv_in.float(), weight.float(), bias.float())
    ref_state = state0.clone()
    ref_step = ssd_step(ref_state, x[:, 0].float(), dt[:, 0], A, B[:, 0].float(), C[:, 0].float(), D)
    ref_conv_state = conv_state0.float().clone()
    ref_conv_step = causal_conv1d_step(conv_in[:, :, 0].float(), ref_conv_state, weight.float(), bias.float())

    rows = []
    try:
        # the backends with their own scan, conv or step kernels (the fused decode step of `triton` is
        # timed inside a whole decode step by `experiments/gpu/decode_profile.py`)
        per_op = [name for name in kernels.available() if name == "torch" or any(
            getattr(kernels.backend_ops(name), op, None) for op in ("chunk_scan", "state_update", "conv1d", "conv1d_update"))]
        for backend in per_op:
            kernels.set_backend(backend)
            label = backend if backend != "torch" else "torch (bf16 in)"
            y, final = ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D)
            rows.append(KernelRow("chunk scan fwd", label, _time_ms(lambda: ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D)),
                                  max(_rel(y, ref_y), _rel(final, ref_final))))
            leaves = [t.detach().clone().requires_grad_() for t in (x, B, C)]

            def fwd_bwd():
                out, _ = ssd_chunk_scan(leaves[0], dt, A, leaves[1], leaves[2], chunk_size, D=D)
                out.float().square().mean().backward()

            if kernels.trains(backend):
                rows.append(KernelRow("chunk scan fwd+bwd", label, _time_ms(fwd_bwd, repeats=10), None))
            conv = causal_conv1d(conv_in, weight, bias)
            rows.append(KernelRow("causal conv", label, _time_ms(lambda: causal_conv1d(conv_in, weight, bias)), _rel(conv, ref_conv)))
            steps = kernels.resolved()
            if steps["state_update"] != backend:
                label = f"{backend} (uses {steps['state_update']} for steps)"
            state = state0.clone()
            step = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
            err = max(_rel(step, ref_step), _rel(state, ref_state))
            rows.append(KernelRow("state update (1 token)", label,
                                  _time_ms(lambda: ssd_step(state0.clone(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)), err))
            conv_state = conv_state0.clone()
            conv_step = causal_conv1d_step(conv_in[:, :, 0], conv_state, weight, bias)
            rows.append(KernelRow("conv update (1 token)", label,
                                  _time_ms(lambda: causal_conv1d_step(conv_in[:, :, 0], conv_state0.clone(), weight, bias)),
                                  max(_rel(conv_step, ref_conv_step), _rel(conv_state, ref_conv_state))))
    finally:
        kernels.set_backend("auto")
    rows += decode_attention_rows(length, heads, headdim, batch)
    return rows


def decode_attention_rows(slots: int, heads: int, head_dim: int, batch: int = 1) -> list[KernelRow]:
    """One query token over a static cache of `slots` positions, 3/4 of them in use."""
    from ..kernels.attention import split_kv_decode

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(batch, heads, 1, head_dim, device=device, generator=g).bfloat16()
    k, v = (torch.randn(batch, heads, slots, head_dim, device=device, generator=g).bfloat16() for _ in range(2))
    mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool, device=device)
    mask[..., : slots * 3 // 4] = True
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    split = split_kv_decode(q, k, v, mask[:, 0, 0], head_dim**-0.5)
    return [
        KernelRow(f"decode attention, {slots} slots", "sdpa (masked)",
                  _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), _rel(sdpa, ref)),
        KernelRow(f"decode attention, {slots} slots", "split-KV Triton (graphs engine)",
                  _time_ms(lambda: split_kv_decode(q, k, v, mask[:, 0, 0], head_dim**-0.5)),
                  _rel(split.transpose(1, 2), ref)),
    ]
