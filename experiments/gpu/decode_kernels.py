"""Candidate decode kernels against what the graphs engine uses today (issue #26), on the GPU machine.

    python experiments/gpu/decode_kernels.py [attention] [gemv] > docs/results/bench/decode-kernels-h200.txt
    python experiments/gpu/decode_kernels.py fma > docs/results/bench/decode-attention-fma-h200.txt
    python experiments/gpu/decode_kernels.py small > docs/results/bench/decode-attention-small-h200.txt
    python experiments/gpu/decode_kernels.py tunings > docs/results/bench/decode-attention-tunings-h200.txt

- attention: the split-KV kernel of `kernels/attention.py` against a variant that splits a head dim that is
  not a power of two into two that are (80 = 64 + 16), so no lane loads a padded column, and that drops the
  slot mask when the cache is a whole number of blocks. Same inputs, same graphs, error against SDPA in fp32.
- gemv: cuBLAS (`F.linear`, what the engine runs) against a Triton GEMV over a sweep of tiles, for the
  TinyLLaVA preset's four projections at batch 1.
Each time is the median replay of a CUDA graph over several layers' worth of distinct tensors, so nothing
sits in L2 from one call to the next.
"""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from decode_common import decode_inputs, graph_time, rel_err  # this folder: on the path when the script runs

from matvlm_cli.bench.floor import measure_bandwidth
from matvlm_cli.kernels import attention, sm_count

dev = torch.device("cuda")
DEFAULT_TUNING = dict(attention.TUNING)  # the engine's split-KV tuning
BEFORE = {"block_n": 64, "programs_per_sm": 4, "num_warps": 4, "num_stages": 2}  # its tuning until session 14


@triton.jit
def split_kv_dims(Q, K, V, Mask, Acc, Max, Sum, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                  scale, slots, split_len, heads, splits,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    # As kernels/attention.py's split_kv, with the head dim in two power-of-two parts [0, D0) and
    # [D0, D0 + D1): every lane of a load carries data. EVEN: slots is a multiple of BLOCK, so the loop
    # stops at the cache's end and no slot mask is needed.
    b, kv_head, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, BLOCK_H)
    in_group = rows < GROUP
    h = kv_head * GROUP + rows
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    q_rows = Q + b * sq_b + h[:, None] * sq_h
    q0 = tl.load(q_rows + d0[None, :], mask=in_group[:, None], other=0.0)
    q1 = tl.load(q_rows + d1[None, :], mask=in_group[:, None], other=0.0)
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_H, D1], tl.float32)
    start = s * split_len
    stop = tl.minimum(start + split_len, slots)
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h
    for offset in range(start, stop, BLOCK):
        n = offset + tl.arange(0, BLOCK)
        if EVEN:
            keep = tl.load(Mask + b * sm_b + n) != 0
            k0 = tl.load(k_base + n[:, None] * sk_n + d0[None, :])
            k1 = tl.load(k_base + n[:, None] * sk_n + d1[None, :])
        else:
            in_cache = n < slots
            keep = tl.load(Mask + b * sm_b + n, mask=in_cache, other=0) != 0
            k0 = tl.load(k_base + n[:, None] * sk_n + d0[None, :], mask=in_cache[:, None], other=0.0)
            k1 = tl.load(k_base + n[:, None] * sk_n + d1[None, :], mask=in_cache[:, None], other=0.0)
        scores = (tl.dot(q0, tl.trans(k0)) + tl.dot(q1, tl.trans(k1))) * scale
        scores = tl.where(keep[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(scores - safe_max[:, None])
        rescale = tl.exp(running_max - safe_max)
        if EVEN:
            v0 = tl.load(v_base + n[:, None] * sv_n + d0[None, :])
            v1 = tl.load(v_base + n[:, None] * sv_n + d1[None, :])
        else:
            v0 = tl.load(v_base + n[:, None] * sv_n + d0[None, :], mask=in_cache[:, None], other=0.0)
            v1 = tl.load(v_base + n[:, None] * sv_n + d1[None, :], mask=in_cache[:, None], other=0.0)
        p = p.to(v0.dtype)
        acc0 = acc0 * rescale[:, None] + tl.dot(p, v0)
        acc1 = acc1 * rescale[:, None] + tl.dot(p, v1)
        running_sum = running_sum * rescale + tl.sum(p.to(tl.float32), axis=1)
        running_max = new_max
    out_rows = (b * heads + h) * splits + s
    tl.store(Acc + out_rows[:, None] * HEAD_DIM + d0[None, :], acc0, mask=in_group[:, None])
    tl.store(Acc + out_rows[:, None] * HEAD_DIM + d1[None, :], acc1, mask=in_group[:, None])
    tl.store(Max + out_rows, running_max, mask=in_group)
    tl.store(Sum + out_rows, running_sum, mask=in_group)


def dims_split(dim):
    """(D0, D1), both powers of two and D1 >= 16, with D0 + D1 == dim; None if there is none."""
    d0 = triton.next_power_of_2(dim) // 2 if dim & (dim - 1) else dim // 2
    d1 = dim - d0
    if d1 >= 16 and d1 & (d1 - 1) == 0 and d0 >= 16:
        return d0, d1
    return None


def _slices(slots, pairs, block_n, programs_per_sm):
    """(split_len, splits): the cache cut into at most programs_per_sm x SMs / pairs slices of whole blocks
    (the engine's arithmetic before session 14)."""
    target = programs_per_sm * sm_count(dev)
    splits = max(1, min(triton.cdiv(slots, block_n), target // pairs))
    split_len = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    return split_len, triton.cdiv(slots, split_len)


def _strides(query, key, value, keep8):
    return (query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), keep8.stride(0))


def _split_and_merge(query, keep, splits, launch):
    """Buffers for `splits` slices' partial results, `launch(acc, maxes, sums, keep8)` to fill them, then the
    engine's combine kernel to merge them. Returns (batch, 1, heads, dim)."""
    combine = attention.combine
    batch, heads, _, dim = query.shape
    acc = torch.empty(batch * heads * splits, dim, device=dev, dtype=torch.float32)
    maxes = torch.empty(batch * heads * splits, device=dev, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    out = torch.empty(batch, 1, heads, dim, device=dev, dtype=query.dtype)
    launch(acc, maxes, sums, keep.view(torch.uint8))
    combine[(batch, heads)](
        acc, maxes, sums, out, out.stride(0), out.stride(2), heads, splits,
        HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=triton.next_power_of_2(splits),
    )
    return out


def split_kv_dims_decode(query, key, value, keep, scale, block_n, programs_per_sm, num_warps, num_stages):
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    split_len, splits = _slices(slots, batch * kv_heads, block_n, programs_per_sm)
    d0, d1 = dims_split(dim)
    group = heads // kv_heads

    def launch(acc, maxes, sums, keep8):
        split_kv_dims[(batch, kv_heads, splits)](
            query, key, value, keep8, acc, maxes, sums, *_strides(query, key, value, keep8),
            scale, slots, split_len, heads, splits,
            GROUP=group, HEAD_DIM=dim, D0=d0, D1=d1, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK=block_n,
            EVEN=slots % block_n == 0, num_warps=num_warps, num_stages=num_stages,
        )

    return _split_and_merge(query, keep, splits, launch)


def sweep(configs, call, count, ref):
    """[(seconds per call, config, error against ref)], fastest first: `call(config, i)` runs config on the
    i-th of `count` operand sets; its error is on the first, its time the graph of all of them."""
    rows = []
    for config in configs:
        try:
            err = rel_err(call(config, 0), ref)
            t = graph_time(lambda: [call(config, i) for i in range(count)]) / count
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported and skipped
            print("fail", *config, type(e).__name__, str(e)[:100], flush=True)
            continue
        rows.append((t, config, err))
    return sorted(rows, key=lambda row: row[0])


def attention_variants():
    print("\n== split-KV decode attention: today's kernel against the split-dims kernel ==", flush=True)
    shapes = (  # batch, heads, kv heads, head dim, context, layers per graph
        (1, 32, 32, 80, 8192, 16),
        (1, 32, 32, 80, 32768, 8),
        (24, 32, 32, 80, 8192, 2),
        (1, 32, 8, 128, 8192, 16),
    )
    for batch, heads, kv_heads, dim, ctx, layers in shapes:
        q, ks, vs, keep, ref = decode_inputs(batch, heads, kv_heads, dim, ctx, layers, left_pad=True)
        moved = 2 * batch * kv_heads * ctx * dim * 2
        tag = f"b{batch} h{heads}/{kv_heads}x{dim} ctx {ctx}"
        print(f"{tag}: floor {moved / BW * 1e6:.1f} us/layer", flush=True)
        attention.TUNING.update(BEFORE)
        err = rel_err(attention.split_kv_decode(q, ks[0], vs[0], keep, dim**-0.5), ref)
        t = graph_time(lambda: [attention.split_kv_decode(q, k, v, keep, dim**-0.5) for k, v in zip(ks, vs)]) / layers
        print(f"{tag} the kernel as tuned before session 14: {t * 1e6:6.1f} us/layer {moved / t / 1e9:5.0f} GB/s err {err:.1e}", flush=True)
        if dims_split(dim) is None:
            continue
        configs = [c for c in itertools.product((32, 64, 128), (2, 4, 8), (4, 8), (2, 3, 4)) if not (c[0] == 32 and c[2] == 8)]
        rows = sweep(configs, lambda c, i: split_kv_dims_decode(q, ks[i], vs[i], keep, dim**-0.5, *c), layers, ref)
        for t, (bn, pps, nw, ns), err in rows[:6] + rows[-1:]:
            print(f"{tag} split-dims block_n {bn:3d} programs/SM {pps} warps {nw} stages {ns}: {t * 1e6:6.1f} us/layer "
                  f"{moved / t / 1e9:5.0f} GB/s err {err:.1e}")
        print(f"{tag} worst error over configs {max(r[-1] for r in rows):.1e}", flush=True)
        ks = vs = None
        torch.cuda.empty_cache()


@triton.jit
def split_kv_fma(Q, K, V, Mask, Acc, Max, Sum, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                 scale, slots, split_len, heads, splits,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, USE_KEEP: tl.constexpr):
    # One query head per program (no GQA), products on the CUDA cores instead of padded tensor-core
    # tiles; USE_KEEP=False skips the slot mask's load (what a cache without holes would allow).
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    in_dim = d < HEAD_DIM
    q = tl.load(Q + b * sq_b + h * sq_h + d, mask=in_dim, other=0.0).to(tl.float32)
    running_max = float("-inf")
    running_sum = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = s * split_len
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    for offset in range(start, start + split_len, BLOCK):
        n = offset + tl.arange(0, BLOCK)
        in_cache = n < slots
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :], mask=in_cache[:, None] & in_dim[None, :], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        if USE_KEEP:
            keep = tl.load(Mask + b * sm_b + n, mask=in_cache, other=0) != 0
            scores = tl.where(keep, scores, float("-inf"))
        else:
            scores = tl.where(in_cache, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(scores - safe_max)
        rescale = tl.exp(running_max - safe_max)
        v = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=in_cache[:, None] & in_dim[None, :], other=0.0)
        acc = acc * rescale + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        running_sum = running_sum * rescale + tl.sum(p, axis=0)
        running_max = new_max
    row = (b * heads + h) * splits + s
    tl.store(Acc + row * HEAD_DIM + d, acc, mask=in_dim)
    tl.store(Max + row, running_max)
    tl.store(Sum + row, running_sum)


def split_kv_fma_decode(query, key, value, keep, scale, block_n, programs_per_sm, num_warps, num_stages, use_keep=True):
    batch, heads, _, dim = query.shape
    slots = key.shape[2]
    split_len, splits = _slices(slots, batch * heads, block_n, programs_per_sm)

    def launch(acc, maxes, sums, keep8):
        split_kv_fma[(batch, heads, splits)](
            query, key, value, keep8, acc, maxes, sums, *_strides(query, key, value, keep8),
            scale, slots, split_len, heads, splits,
            HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK=block_n, USE_KEEP=use_keep,
            num_warps=num_warps, num_stages=num_stages,
        )

    return _split_and_merge(query, keep, splits, launch)


def attention_fma():
    print("\n== split-KV decode, MHA: today's kernel by context, and a CUDA-core kernel ==", flush=True)
    for ctx, layers in ((2048, 16), (4096, 16), (8192, 16), (16384, 8), (32768, 8)):
        batch, heads, dim = 1, 32, 80
        q, ks, vs, keep, ref = decode_inputs(batch, heads, heads, dim, ctx, layers)
        moved = 2 * batch * heads * (ctx + 128) * dim * 2
        tag = f"b1 h32x80 ctx {ctx}"
        attention.TUNING.update(BEFORE)
        t = graph_time(lambda: [attention.split_kv_decode(q, k, v, keep, dim**-0.5) for k, v in zip(ks, vs)]) / layers
        print(f"{tag}: floor (all slots) {moved / BW * 1e6:.1f} us; today's kernel {t * 1e6:.1f} us {moved / t / 1e9:.0f} GB/s", flush=True)
        if ctx not in (8192, 32768):
            continue
        # the mask-free variant reads the slots past ctx too: its error against ref is not meaningful
        configs = [c for c in itertools.product((32, 64, 128), (4, 8), (2, 4, 8), (2, 3), (True, False)) if c[4] or (c[1], c[3]) == (4, 2)]
        rows = sweep(configs, lambda c, i: split_kv_fma_decode(q, ks[i], vs[i], keep, dim**-0.5, *c), layers, ref)
        for t, (bn, pps, nw, ns, use_keep), err in rows[:6]:
            print(f"{tag} cuda-core block_n {bn:3d} programs/SM {pps} warps {nw} stages {ns} mask {use_keep}: "
                  f"{t * 1e6:6.1f} us {moved / t / 1e9:5.0f} GB/s err {err:.1e}", flush=True)
        ks = vs = None
        torch.cuda.empty_cache()


def attention_small_programs():
    print("\n== today's split-KV kernel, MHA b1 h32x80: configs outside the first sweep (1-2 warps, 1 stage, 8-32 programs/SM) ==", flush=True)

    def tuned(config, q, k, v, keep):
        bn, pps, nw, ns = config
        attention.TUNING.update(block_n=bn, programs_per_sm=pps, num_warps=nw, num_stages=ns)
        return attention.split_kv_decode(q, k, v, keep, 80**-0.5)

    for ctx, layers in ((128, 16), (8192, 16), (32768, 8)):
        q, ks, vs, keep, ref = decode_inputs(1, 32, 32, 80, ctx, layers)
        moved = 2 * 32 * (ctx + 128) * 80 * 2
        configs = list(itertools.product((16, 32, 64), (4, 8, 16, 32), (1, 2, 4), (1, 2, 3)))
        rows = sweep(configs, lambda c, i: tuned(c, q, ks[i], vs[i], keep), layers, ref)
        for t, (bn, pps, nw, ns), err in rows[:5]:
            print(f"ctx {ctx} block_n {bn:3d} programs/SM {pps:2d} warps {nw} stages {ns}: {t * 1e6:6.1f} us "
                  f"{moved / t / 1e9:5.0f} GB/s err {err:.1e}", flush=True)
        ks = vs = None
        torch.cuda.empty_cache()
    attention.TUNING.update(DEFAULT_TUNING)


def attention_tunings():
    print("\n== split-KV decode attention: the tuning before session 14 against the engine's ==", flush=True)
    for batch, heads, kv_heads, dim, ctx, layers in ((1, 32, 32, 80, 8192, 16), (1, 32, 32, 80, 32768, 8),
                                                     (24, 32, 32, 80, 8192, 2), (1, 32, 8, 128, 8192, 16),
                                                     (4, 32, 32, 80, 8192, 8)):
        q, ks, vs, keep, ref = decode_inputs(batch, heads, kv_heads, dim, ctx, layers)
        moved = 2 * batch * kv_heads * ctx * dim * 2
        line = f"b{batch} h{heads}/{kv_heads}x{dim} ctx {ctx}:"
        for name, tuning in (("before", BEFORE), ("engine", DEFAULT_TUNING)):
            attention.TUNING.update(tuning)
            err = rel_err(attention.split_kv_decode(q, ks[0], vs[0], keep, dim**-0.5), ref)
            t = graph_time(lambda: [attention.split_kv_decode(q, k, v, keep, dim**-0.5) for k, v in zip(ks, vs)]) / layers
            line += f" {name} {t * 1e6:6.1f} us ({moved / t / 1e9:4.0f} GB/s, err {err:.0e});"
        print(line, flush=True)
        ks = vs = None
        torch.cuda.empty_cache()
    attention.TUNING.update(DEFAULT_TUNING)


@triton.jit
def gemv_kernel(X, W, Bias, Y, N, K, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y = W x (+ b) for one token: each program owns BLOCK_N output rows and streams their weights.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        x = tl.load(X + cols)
        w = tl.load(W + rows[:, None] * K + cols[None, :], mask=in_rows[:, None], other=0.0)
        acc += w.to(tl.float32) * x[None, :].to(tl.float32)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(Bias + rows, mask=in_rows, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=in_rows)


def triton_gemv(x, w, b, block_n, block_k, num_warps, num_stages):
    n, k = w.shape
    y = torch.empty(n, device=dev, dtype=x.dtype)
    gemv_kernel[(triton.cdiv(n, block_n),)](x, w, b, y, n, k, HAS_BIAS=b is not None, BLOCK_N=block_n,
                                            BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y


def gemv_variants():
    print("\n== GEMV at batch 1, bf16 with bias: cuBLAS (F.linear) against a Triton GEMV ==", flush=True)
    for n_in, n_out, what in ((2560, 7680, "q/k/v"), (2560, 2560, "dense"), (2560, 10240, "fc1"), (10240, 2560, "fc2")):
        count = 24
        ws = [torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(count)]
        bs = [torch.randn(n_out, device=dev, dtype=torch.bfloat16) for _ in range(count)]
        x = torch.randn(n_in, device=dev, dtype=torch.bfloat16)
        size = n_in * n_out * 2
        t = graph_time(lambda: [F.linear(x, w, b) for w, b in zip(ws, bs)]) / count
        print(f"{what} {n_in} -> {n_out} ({size / 1e6:.1f} MB): floor {size / BW * 1e6:.1f} us; "
              f"cuBLAS {t * 1e6:.1f} us {size / t / 1e9:.0f} GB/s", flush=True)
        ref = F.linear(x.float(), ws[0].float(), bs[0].float())
        configs = [c for c in itertools.product((2, 4, 8, 16), (128, 256, 512), (2, 4, 8), (1, 2, 3, 4)) if c[0] * c[1] <= 8192]
        rows = sweep(configs, lambda c, i: triton_gemv(x, ws[i], bs[i], *c), count, ref)
        for t, (bn, bk, nw, ns), err in rows[:4]:
            print(f"{what} triton block_n {bn:2d} block_k {bk:4d} warps {nw} stages {ns}: {t * 1e6:5.1f} us "
                  f"{size / t / 1e9:5.0f} GB/s err {err:.1e}", flush=True)
        ws = bs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    BW = measure_bandwidth(dev)
    print(f"copy bandwidth {BW / 1e9:.0f} GB/s", flush=True)
    parts = sys.argv[1:] or ["attention", "gemv"]
    if "attention" in parts:
        attention_variants()
    if "tunings" in parts:
        attention_tunings()
    if "small" in parts:
        attention_small_programs()
    if "fma" in parts:
        attention_fma()
    if "gemv" in parts:
        gemv_variants()
