"""Decoding attention for the `graphs` engine: one query token over a static KV cache.

A static cache has more slots than tokens, so decoding attention needs a mask. Masked SDPA cannot use
its flash kernel, and its memory-efficient kernel gives one query of one head to one thread block:
32 blocks for a batch-1 Phi-2, a quarter of an H100 (`matvlm bench --kernels` times it). On CUDA this
module uses a split-KV ("flash-decoding") Triton kernel instead: every (sequence, head, slice of the
cache) gets its own program, which reads only the unmasked slots of its slice and keeps a running
softmax; a second kernel merges the slices. Elsewhere, and for longer queries (prefill), it is SDPA.

Registered with transformers' attention interface as `matvlm_decode`; the mask is built as for SDPA.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

DECODE_ATTENTION = "matvlm_decode"
BLOCK_N = 64  # cache slots a program reads per step
TARGET_PROGRAMS = 528  # about 4 per SM of an H100: enough slices to keep the memory system busy


try:  # resolved at import, so the compiled decode step sees a constant, not a call it cannot trace
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


@functools.cache
def _triton_kernels():
    """The two Triton kernels (compiled by Triton on first launch)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kv(Q, K, V, Mask, Acc, Max, Sum, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                 scale, slots, split_len, heads, splits,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_head = h // GROUP
        d = tl.arange(0, BLOCK_D)
        in_dim = d < HEAD_DIM
        q = tl.load(Q + b * sq_b + h * sq_h + d, mask=in_dim, other=0.0).to(tl.float32) * scale
        running_max = tl.full([], float("-inf"), tl.float32)
        running_sum = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        start = s * split_len
        for offset in range(0, split_len, BLOCK):
            n = start + offset + tl.arange(0, BLOCK)
            keep = tl.load(Mask + b * sm_b + n, mask=n < slots, other=0) != 0
            both = keep[:, None] & in_dim[None, :]
            k = tl.load(K + b * sk_b + kv_head * sk_h + n[:, None] * sk_n + d[None, :], mask=both, other=0.0)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            scores = tl.where(keep, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(scores - safe_max)
            rescale = tl.exp(running_max - safe_max)
            v = tl.load(V + b * sv_b + kv_head * sv_h + n[:, None] * sv_n + d[None, :], mask=both, other=0.0)
            acc = acc * rescale + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            running_sum = running_sum * rescale + tl.sum(p, axis=0)
            running_max = new_max
        row = (b * heads + h) * splits + s
        tl.store(Acc + row * HEAD_DIM + d, acc, mask=in_dim)
        tl.store(Max + row, running_max)
        tl.store(Sum + row, running_sum)

    @triton.jit
    def combine(Acc, Max, Sum, Out, so_b, so_h, heads, splits,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        in_split = s < splits
        rows = (b * heads + h) * splits + s
        maxes = tl.load(Max + rows, mask=in_split, other=float("-inf"))
        sums = tl.load(Sum + rows, mask=in_split, other=0.0)
        top = tl.max(maxes, axis=0)
        weights = tl.where(in_split, tl.exp(maxes - tl.where(top == float("-inf"), 0.0, top)), 0.0)
        total = tl.sum(sums * weights, axis=0)
        d = tl.arange(0, BLOCK_D)
        in_dim = d < HEAD_DIM
        acc = tl.load(Acc + rows[:, None] * HEAD_DIM + d[None, :], mask=in_split[:, None] & in_dim[None, :], other=0.0)
        out = tl.sum(acc * weights[:, None], axis=0) / total
        tl.store(Out + b * so_b + h * so_h + d, out.to(Out.dtype.element_ty), mask=in_dim)

    return triton, split_kv, combine


# A custom op is opaque to torch.compile: the compiled decode step calls the kernels as they are,
# without a graph break per layer.
@torch.library.custom_op("matvlm::split_kv_decode", mutates_args=())
def split_kv_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """query (b, h, 1, d); key/value (b, kv_heads, slots, d); keep (b, slots) bool.
    Returns (b, 1, h, d) in the query's dtype."""
    triton, split_kv, combine = _triton_kernels()
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    splits = max(1, min(triton.cdiv(slots, BLOCK_N), TARGET_PROGRAMS // (batch * heads)))
    split_len = triton.cdiv(triton.cdiv(slots, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(slots, split_len)
    acc = torch.empty(batch * heads * splits, dim, device=query.device, dtype=torch.float32)
    maxes = torch.empty(batch * heads * splits, device=query.device, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    block_d = triton.next_power_of_2(dim)
    keep = keep.view(torch.uint8)
    split_kv[(batch, heads, splits)](
        query, key, value, keep, acc, maxes, sums,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), keep.stride(0),
        scale, slots, split_len, heads, splits,
        GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK=BLOCK_N,
    )
    combine[(batch, heads)](
        acc, maxes, sums, out, out.stride(0), out.stride(2), heads, splits,
        HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
    )
    return out


@split_kv_decode.register_fake
def _(query, key, value, keep, scale):
    batch, heads, _, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


def _can_split(query, key, attention_mask, kwargs) -> bool:
    return (
        HAVE_TRITON and query.is_cuda and query.shape[2] == 1
        and attention_mask is not None and attention_mask.dtype == torch.bool
        and attention_mask.shape[1] == attention_mask.shape[2] == 1
        and query.stride(-1) == 1 and key.stride(-1) == 1
        and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None
    )


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: split-KV Triton kernel for one-token queries on CUDA, SDPA otherwise."""
    if not _can_split(query, key, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    keep = attention_mask[:, 0, 0, : key.shape[2]]
    return split_kv_decode(query, key, value, keep, scale), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])
