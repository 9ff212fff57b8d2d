"""Decoding attention for the `graphs` engine: one query token over a static KV cache.

A static cache has more slots than tokens, so decoding attention needs a mask. Masked SDPA cannot use
its flash kernel, and its memory-efficient kernel gives one query of one head to one thread block:
32 blocks for a batch-1 Phi-2, a quarter of an H100 (`matvlm bench --kernels` times it). On CUDA this
module uses a split-KV ("flash-decoding") Triton kernel instead: every (sequence, head, slice of the
cache) gets its own program, which reads only the unmasked slots of its slice and keeps a running
softmax; a second kernel merges the slices. Elsewhere it is SDPA.

Prefill in chunks meets the same problem at a larger scale: a chunk after the first attends to the
cached chunks through a mask over every slot of the static cache, so SDPA takes its memory-efficient
kernel over all slots, filled or not (at 8k, three of four chunks read 8320 keys each). When that mask
is plain causal over the filled slots (no padding, no bidirectional image block: it is checked, once
per forward), the keys are cut to the filled slots and SDPA runs its flash kernel with the causal
diagonal aligned to the last key, as one forward over the whole prompt would.

Registered with transformers' attention interface as `matvlm_decode`; the mask is built as for SDPA.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from . import pdl, sm_count

DECODE_ATTENTION = "matvlm_decode"
# Tuning, from sweeps on an H200 (experiments/gpu/decode_kernels.py, decode-attention-small-h200.txt). When
# there are too few (sequence, KV head) pairs to fill the card (batch 1), the cache is cut into slices:
# many small programs (one warp, 16 slots a step, 8 per SM) keep the most loads in flight; at 8k tokens that
# took a layer from 34.4 to 30.2 us, at 32k from 102.9 to 90.2 (decode-attention-tunings-h200.txt). When
# there are enough pairs, each program reads a whole sequence with 4 warps, 128 slots a step (3.9 TB/s at
# batch 24 and 8k, attention-sweep-h200.txt).
TUNING = {"block_n": 16, "programs_per_sm": 8, "num_warps": 1, "num_stages": 3}
WHOLE_SEQUENCE = {"block_n": 128, "num_warps": 4, "num_stages": 2}


try:  # resolved at import, so the compiled decode step sees a constant, not a call it cannot trace
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


if HAVE_TRITON:
    # The Triton kernels (compiled by Triton on first launch): split_kv, its loop over one slice of the cache
    # (`attend_slice`, which experiments/gpu/decode_combine.py's variant calls too), and combine.

    @triton.jit
    def attend_slice(Q, K, V, Mask, b, kv_head, s, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                     scale, slots, split_len,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        # The GROUP query heads that share one KV head, over one slice of the cache: (acc, running max,
        # running sum) of the slice's softmax. The queries are padded to BLOCK_H rows so both products run
        # on tensor cores, which lets Triton pipeline the K and V loads (a memory-bound kernel needs many
        # bytes in flight).
        rows = tl.arange(0, BLOCK_H)
        in_group = rows < GROUP
        h = kv_head * GROUP + rows
        d = tl.arange(0, BLOCK_D)
        in_dim = d < HEAD_DIM
        if USE_PDL:  # the query and this token's key and value come from the kernels before (kernels.pdl)
            tl.extra.cuda.gdc_wait()
        q = tl.load(Q + b * sq_b + h[:, None] * sq_h + d[None, :], mask=in_group[:, None] & in_dim[None, :], other=0.0)
        running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        start = s * split_len
        k_base = K + b * sk_b + kv_head * sk_h
        v_base = V + b * sv_b + kv_head * sv_h
        for offset in range(start, start + split_len, BLOCK):
            n = offset + tl.arange(0, BLOCK)
            in_cache = n < slots
            keep = tl.load(Mask + b * sm_b + n, mask=in_cache, other=0) != 0
            k = tl.load(k_base + n[:, None] * sk_n + d[None, :], mask=in_cache[:, None] & in_dim[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(keep[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(scores - safe_max[:, None])
            rescale = tl.exp(running_max - safe_max)
            v = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=in_cache[:, None] & in_dim[None, :], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            running_sum = running_sum * rescale + tl.sum(p, axis=1)
            running_max = new_max
        return acc, running_max, running_sum

    @triton.jit
    def split_kv(Q, K, V, Mask, Acc, Max, Sum, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                 scale, slots, split_len, heads, splits,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        # One program: one (sequence, KV head, slice of the cache); its partial results go to Acc, Max and
        # Sum for `combine` (Triton inlines attend_slice).
        b, kv_head, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        acc, running_max, running_sum = attend_slice(
            Q, K, V, Mask, b, kv_head, s, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, scale, slots, split_len,
            GROUP, HEAD_DIM, BLOCK_D, BLOCK_H, BLOCK, USE_PDL,
        )
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.arange(0, BLOCK_H)
        in_group = rows < GROUP
        d = tl.arange(0, BLOCK_D)
        out_rows = (b * heads + kv_head * GROUP + rows) * splits + s
        tl.store(Acc + out_rows[:, None] * HEAD_DIM + d[None, :], acc, mask=in_group[:, None] & (d < HEAD_DIM)[None, :])
        tl.store(Max + out_rows, running_max, mask=in_group)
        tl.store(Sum + out_rows, running_sum, mask=in_group)

    @triton.jit
    def combine(Acc, Max, Sum, Out, so_b, so_h, heads, splits,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
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
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        out = tl.sum(acc * weights[:, None], axis=0) / total
        tl.store(Out + b * so_b + h * so_h + d, out.to(Out.dtype.element_ty), mask=in_dim)


# A custom op is opaque to torch.compile: the compiled decode step calls the kernels as they are,
# without a graph break per layer.
@torch.library.custom_op("matvlm::split_kv_decode", mutates_args=())
def split_kv_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """query (b, h, 1, d); key/value (b, kv_heads, slots, d); keep (b, slots) bool.
    Returns (b, 1, h, d) in the query's dtype."""
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    target = TUNING["programs_per_sm"] * sm_count(query.device)
    splits = min(triton.cdiv(slots, TUNING["block_n"]), target // (batch * kv_heads))
    tuning = TUNING if splits > 1 else WHOLE_SEQUENCE
    block_n = tuning["block_n"]
    splits = max(1, splits)
    split_len = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    splits = triton.cdiv(slots, split_len)
    acc = torch.empty(batch * heads * splits, dim, device=query.device, dtype=torch.float32)
    maxes = torch.empty(batch * heads * splits, device=query.device, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    block_d = triton.next_power_of_2(dim)
    keep = keep.view(torch.uint8)
    group = heads // kv_heads
    use_pdl = pdl(query.device)
    split_kv[(batch, kv_heads, splits)](
        query, key, value, keep, acc, maxes, sums,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), keep.stride(0),
        scale, slots, split_len, heads, splits,
        GROUP=group, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK=block_n,
        USE_PDL=use_pdl, num_warps=tuning["num_warps"], num_stages=tuning["num_stages"], launch_pdl=use_pdl,
    )
    combine[(batch, heads)](
        acc, maxes, sums, out, out.stride(0), out.stride(2), heads, splits,
        HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), USE_PDL=use_pdl, launch_pdl=use_pdl,
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


# The last mask checked by `causal_prefix` and its answer: every layer of one forward gets the same mask object.
_checked: tuple[weakref.ref | None, int | None] = (None, None)


def causal_prefix(mask: torch.Tensor) -> int | None:
    """`end` when a (batch, 1, q, slots) boolean mask lets query i of every row see exactly slots
    0 .. end - q + i (plain causal attention over the first `end` slots, the queries being the last q of
    them); None for any other mask (padding, sliding windows, bidirectional blocks). One device sync per
    mask object."""
    global _checked
    ref, answer = _checked
    if ref is not None and ref() is mask:
        return answer
    rows = mask[:, 0]
    q_len, slots = rows.shape[-2:]
    seen = rows[:, -1].sum(-1)  # slots the last query sees, per row
    first = seen[0]
    visible = first - q_len + 1 + torch.arange(q_len, device=mask.device)  # slots query i may see
    expected = torch.arange(slots, device=mask.device)[None, :] < visible[:, None]
    plain = (rows == expected).all() & (seen == first).all() & (first >= q_len)
    plain, end = torch.stack([plain.long(), first.long()]).tolist()
    answer = end if plain else None
    _checked = (weakref.ref(mask), answer)
    return answer


def _can_cut_prefill(query, key, attention_mask, dropout, kwargs) -> bool:
    return (
        query.shape[2] > 1 and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[-1] == key.shape[2]
        and not dropout and not torch.compiler.is_compiling()
        and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None and kwargs.get("position_bias") is None
    )


def prefill_attention(query, key, value, attention_mask, scale: float | None) -> torch.Tensor | None:
    """Attention of a prefill chunk over the filled slots only, when its mask is plain causal over them;
    None otherwise. Returns (batch, q, heads, dim) as transformers' attention functions do."""
    end = causal_prefix(attention_mask)
    if end is None:
        return None
    key, value = key[:, :, :end], value[:, :, :end]
    if key.shape[1] != query.shape[1]:  # grouped-query attention: one copy of each KV head per query head
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    # On CUDA, `causal_lower_right` sends SDPA to its flash kernel (the efficient one in float32); elsewhere
    # the mask cut to the same slots computes the same thing.
    mask = causal_lower_right(query.shape[2], end) if query.is_cuda else attention_mask[..., :end]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: split-KV Triton kernel for one-token queries on CUDA, flash
    attention over the filled slots for plain-causal prefill chunks, SDPA otherwise."""
    if _can_cut_prefill(query, key, attention_mask, dropout, kwargs):
        out = prefill_attention(query, key, value, attention_mask, scaling)
        if out is not None:
            return out, None
    if not _can_split(query, key, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    keep = attention_mask[:, 0, 0, : key.shape[2]]
    return split_kv_decode(query, key, value, keep, scale), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])
