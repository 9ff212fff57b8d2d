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
attention mask, or nothing), and which some text models never see: Gemma 3's and PaliGemma's wrappers
hand theirs a dict of 4-D masks. `PaddingMaskTap` records it from the whole model's forward call and
from the text model's, whichever is called, the innermost 2-D mask winning.
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
    """The 2-D attention mask of the current forward call of the hooked modules (the whole model and its
    text model): each call pushes its mask, or inherits its caller's when it has no 2-D one, and pops it
    on return. After the outermost call the last mask stays readable: gradient checkpointing reruns
    the layers during backward, and the trainer's layer loss reruns mixers on the same batch."""

    def __init__(self):
        self._masks: list[torch.Tensor | None] = []
        self._last: torch.Tensor | None = None

    def attach(self, *modules: nn.Module) -> None:
        for module in dict.fromkeys(modules):  # once each, even when the model is its own text model
            module.register_forward_pre_hook(self._enter, with_kwargs=True)
            module.register_forward_hook(self._exit, always_call=True)

    def _enter(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            mask = self._masks[-1] if self._masks else None  # the caller's, never a finished call's
        self._masks.append(mask)

    def _exit(self, module, args, output):
        if self._masks:
            self._last = self._masks.pop()

    @property
    def mask(self) -> torch.Tensor | None:
        return self._masks[-1] if self._masks else self._last

    def for_last(self, length: int) -> torch.Tensor | None:
        """The mask over the last `length` positions, or None when there is nothing to mask."""
        mask = self.mask
        if mask is None or mask.shape[1] < length:
            return None
        return mask[:, -length:]
