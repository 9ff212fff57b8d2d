"""Attention over packed rows: several records one after another in one row, each seeing only itself.

A packed batch carries transformers' own packing inputs (those of its DataCollatorWithFlattening):
`position_ids` that start again at 0 with each record, `seq_idx` (each position's record),
`cu_seq_lens_q` (the record boundaries over the flattened rows, int32) and `max_length_q` (an upper
bound on a record's length). The Mamba-2 mixers read `seq_idx` and `cu_seq_lens_q` themselves. Attention
reads them through `ATTENTION`, an attention function registered with transformers that the text
decoder runs while `packed_attention` is open:

- on a GPU in bf16/fp16, PyTorch's variable-length flash attention (`torch.nn.attention.varlen`), which
  only computes the blocks inside each record;
- elsewhere, scaled-dot-product attention under a block-diagonal causal mask built from `seq_idx`,
  which is exactly the attention each record gets alone.

transformers builds no 4-D mask for an attention function it has no mask function for, so a packed
forward makes no (rows, 1, length, length) mask either.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig

ATTENTION = "matvlm_packed"


def _varlen():
    """PyTorch's varlen flash attention and how this version asks for a causal mask, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:  # torch >= 2.12: (-1, 0) is causal
        return varlen_attn, {"window_size": (-1, 0)}, "scale" in parameters
    if "is_causal" in parameters:
        return varlen_attn, {"is_causal": True}, "scale" in parameters
    return None


VARLEN = _varlen()


def attend_within_records(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          seq_idx: torch.Tensor | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                          max_length_q: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (b, h, l, d), key and value (b, kv heads, l, d);
    returns (b, l, h, d)."""
    if seq_idx is None or cu_seq_lens_q is None:
        raise ValueError(f"{ATTENTION} attention needs a packed batch (seq_idx, cu_seq_lens_q)")
    if getattr(module, "sliding_window", None):
        raise ValueError(f"{ATTENTION} attention is causal attention without a window")
    batch, heads, length, head_dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each query head reads its group's key and value
        key, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, value))
    default_scale = scaling is None or abs(scaling - head_dim**-0.5) < 1e-12
    if VARLEN and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and (VARLEN[2] or default_scale) and not dropout:
        varlen_attn, causal, takes_scale = VARLEN
        flat = [t.transpose(1, 2).reshape(batch * length, heads, head_dim) for t in (query, key, value)]
        cu = cu_seq_lens_q.to(torch.int32)
        out = varlen_attn(*flat, cu, cu, max_length_q, max_length_q, **causal,
                          **({"scale": scaling} if takes_scale and scaling is not None else {}))
        return out.reshape(batch, length, heads, head_dim), None
    position = torch.arange(length, device=query.device)
    allowed = (seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(-2)) & (position.unsqueeze(-1) >= position)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed.unsqueeze(1), dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, attend_within_records)


@contextmanager
def packed_attention(*decoders: nn.Module):
    """While open, the attention of `decoders` (text models, decoder layers) runs `ATTENTION`. Every
    config they hold is switched: a deep-copied layer (the teacher's own copy of a trained layer) holds a
    copy of the config, which the text model's would not reach."""
    configs = {id(c): c for d in decoders for m in d.modules() if isinstance(c := getattr(m, "config", None), PreTrainedConfig)}
    previous = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]
