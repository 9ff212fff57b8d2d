"""Split-KV decoding attention whose last program per KV head merges the slices, against the engine's two
kernels (issue #26, prepared in session 18, not yet run on a GPU).

In the H200 profiles at 8k the engine's `combine` is a kernel of 2.5 us a layer (0.08 ms a step for the
teacher) that reads 33 slices' partial results per head, a few KB. Here each split-KV program, after storing
its slice's partials, counts itself done on an atomic counter per (sequence, KV head), with release and
acquire ordering; the program that counts last reads every slice's partials (through L2, not its own L1)
and writes the output, then sets the counter back to 0, so a CUDA graph can replay the kernel.

    python experiments/gpu/decode_combine.py > docs/results/bench/decode-combine-h200.txt

Times are the median replay of a CUDA graph over several layers' distinct caches (decode_common.graph_time),
the engine's kernels launched as the engine launches them (PDL on where it is on), the variant the same way.
The error is against float32 SDPA. Without a GPU, `TRITON_INTERPRET=1 python experiments/gpu/decode_combine.py
--cpu` runs it in Triton's interpreter on small shapes; the interpreter runs programs one after another, so
that checks the arithmetic, not the ordering.
"""

import sys

import torch
import triton
import triton.language as tl
from decode_common import decode_inputs, graph_time, rel_err  # this folder: on the path when the script runs

from matvlm_cli.kernels import attention, pdl, sm_count

attend_slice = attention.attend_slice  # the engine's split_kv loop, called (and inlined) below


@triton.jit
def split_kv_merging(Q, K, V, Mask, Acc, Max, Sum, Done, Out, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                     so_b, so_h, scale, slots, split_len, heads, kv_heads, splits,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr):
    # The engine's split_kv (kernels/attention.py), then the merge by whichever program finishes last.
    b, kv_head, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc, running_max, running_sum = attend_slice(
        Q, K, V, Mask, b, kv_head, s, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, scale, slots, split_len,
        GROUP, HEAD_DIM, BLOCK_D, BLOCK_H, BLOCK, USE_PDL,
    )
    rows = tl.arange(0, BLOCK_H)
    in_group = rows < GROUP
    h = kv_head * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    in_dim = d < HEAD_DIM
    out_rows = (b * heads + h) * splits + s
    tl.store(Acc + out_rows[:, None] * HEAD_DIM + d[None, :], acc, mask=in_group[:, None] & in_dim[None, :])
    tl.store(Max + out_rows, running_max, mask=in_group)
    tl.store(Sum + out_rows, running_sum, mask=in_group)
    tl.debug_barrier()  # every thread's stores issued before the count (the atomic releases them)
    counter = Done + b * kv_heads + kv_head
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == splits - 1:
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        slice_ids = tl.arange(0, BLOCK_S)
        in_split = slice_ids < splits
        for g in range(GROUP):
            head_rows = (b * heads + kv_head * GROUP + g) * splits + slice_ids
            maxes = tl.load(Max + head_rows, mask=in_split, other=float("-inf"), cache_modifier=".cg")
            sums = tl.load(Sum + head_rows, mask=in_split, other=0.0, cache_modifier=".cg")
            top = tl.max(maxes, axis=0)
            weights = tl.where(in_split, tl.exp(maxes - tl.where(top == float("-inf"), 0.0, top)), 0.0)
            total = tl.sum(sums * weights, axis=0)
            partials = tl.load(Acc + head_rows[:, None] * HEAD_DIM + d[None, :], mask=in_split[:, None] & in_dim[None, :],
                               other=0.0, cache_modifier=".cg")
            merged = tl.sum(partials * weights[:, None], axis=0) / total
            tl.store(Out + b * so_b + (kv_head * GROUP + g) * so_h + d, merged.to(Out.dtype.element_ty), mask=in_dim)
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call (or graph replay)
    elif USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


_counters = {}


def merging_decode(query, key, value, keep, scale):
    """As kernels.attention.split_kv_decode at batch 1's tuning, in one kernel. The counters are zeroed once
    per device and left at zero by every call."""
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    tuning = attention.TUNING
    splits = max(1, min(triton.cdiv(slots, tuning["block_n"]), tuning["programs_per_sm"] * sm_count(query.device) // (batch * kv_heads)))
    split_len = triton.cdiv(triton.cdiv(slots, splits), tuning["block_n"]) * tuning["block_n"]
    splits = triton.cdiv(slots, split_len)
    counters = _counters.get(query.device)
    if counters is None or counters.numel() < batch * kv_heads:
        counters = _counters[query.device] = torch.zeros(max(4096, batch * kv_heads), dtype=torch.int32, device=query.device)
    acc = torch.empty(batch * heads * splits, dim, device=query.device, dtype=torch.float32)
    maxes = torch.empty(batch * heads * splits, device=query.device, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    keep8 = keep.view(torch.uint8)
    group = heads // kv_heads
    use_pdl = pdl(query.device)
    split_kv_merging[(batch, kv_heads, splits)](
        query, key, value, keep8, acc, maxes, sums, counters, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), keep8.stride(0), out.stride(0), out.stride(2),
        scale, slots, split_len, heads, kv_heads, splits,
        GROUP=group, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK=tuning["block_n"], BLOCK_S=triton.next_power_of_2(splits), USE_PDL=use_pdl,
        num_warps=tuning["num_warps"], num_stages=tuning["num_stages"], launch_pdl=use_pdl,
    )
    return out


def main(cpu: bool):
    device = "cpu" if cpu else "cuda"
    shapes = [(1, 4, 2, 32, 200, 2), (1, 4, 4, 80, 300, 2)] if cpu else [(1, 32, 32, 80, 8192, 16), (1, 32, 32, 80, 32768, 8), (1, 32, 8, 128, 8192, 16)]
    if not cpu:
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for batch, heads, kv_heads, dim, ctx, layers in shapes:
        q, ks, vs, keep, ref = decode_inputs(batch, heads, kv_heads, dim, ctx, layers, left_pad=True, device=device)
        if cpu:
            q, ks, vs = q.float(), [k.float() for k in ks], [v.float() for v in vs]
        tag = f"b{batch} h{heads}/{kv_heads}x{dim} ctx {ctx}"
        line = tag + ":"
        for name, kernel in (("engine (split_kv + combine)", attention.split_kv_decode), ("last program merges", merging_decode)):
            err = max(rel_err(kernel(q, ks[0], vs[0], keep, dim**-0.5), ref) for _ in range(3))  # counters reset each call
            line += f" {name} err {err:.1e}"
            if not cpu:
                t = graph_time(lambda: [kernel(q, k, v, keep, dim**-0.5) for k, v in zip(ks, vs)]) / layers
                line += f" {t * 1e6:6.2f} us/layer;"
        print(line, flush=True)
        ks = vs = None


if __name__ == "__main__":
    main("--cpu" in sys.argv)
