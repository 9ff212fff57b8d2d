"""How a Mamba-2 layer keeps its state inside transformers' own cache objects.

transformers (5.17+) has `LinearAttentionLayer`: a cache slot holding a conv window and a
recurrent state in buffers that are updated in place, which beam search (`reorder_cache`),
`reset()` and CUDA graphs already understand. `generate()` builds a `DynamicCache` or
`StaticCache` from the teacher's config, i.e. with an attention slot at every layer; the first time
a Mamba layer sees the cache, it swaps its own slot for a `LinearAttentionLayer`. The model class
and config stay the teacher's, so this works for any decoder family without a private cache class.
`Cache.get_seq_length()` skips linear-attention slots, so attention layers still see the right
positions.

The mixer also needs the 2-D padding mask, which decoder layers do not pass on (they pass a 4-D
attention mask, or nothing). `PaddingMaskTap` records it from the text model's forward call.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, LinearAttentionLayer


def mamba_cache_slot(cache: Cache, layer_idx: int) -> LinearAttentionLayer:
    """The linear-attention slot of `layer_idx` in `cache`, creating it on first use."""
    layers = cache.layers
    while len(layers) <= layer_idx:  # caches that grow their layer list lazily
        layers.append(cache.layer_class_to_replicate() if cache.layer_class_to_replicate else None)
    slot = layers[layer_idx]
    if not isinstance(slot, LinearAttentionLayer):
        slot = LinearAttentionLayer()
        layers[layer_idx] = slot
    return slot


def cache_bytes_per_token(num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """KV-cache bytes one attention layer stores per token."""
    return 2 * num_kv_heads * head_dim * dtype_bytes


class PaddingMaskTap:
    """Holds the 2-D attention mask of the text model's current forward call."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self._handle = None

    def attach(self, text_model: nn.Module) -> None:
        self._handle = text_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def for_last(self, length: int) -> torch.Tensor | None:
        """The mask over the last `length` positions, or None when there is nothing to mask."""
        if self.mask is None or self.mask.shape[1] < length:
            return None
        return self.mask[:, -length:]
