"""The `graphs` engine's static cache: transformers' `StaticCache`, whose full-attention layers write one
decoding token in one kernel (`kernels/cache_write.py`) instead of three.

The layers change class, not behaviour: `OneTokenWriteLayer.update` leaves the keys, values and
`cumulative_length` as `StaticLayer.update` does, and hands every update it does not take (a prefill
chunk, a batch, a CPU) to it. Sliding-window and Mamba layers are left as they are.
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from ..kernels import cache_write


class OneTokenWriteLayer(StaticLayer):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.is_initialized and cache_write.takes(self.keys, self.values, key_states, value_states, self.cumulative_length):
            cache_write.write_token(self.keys, self.values, key_states, value_states, self.cumulative_length)
            return self.keys, self.values
        return super().update(key_states, value_states, *args, **kwargs)


def new_static_cache(config, max_len: int) -> StaticCache:
    """An empty static cache of `max_len` slots (its layers are allocated by the first forward)."""
    cache = StaticCache(config=config, max_cache_len=max_len)
    for layer in cache.layers:
        if type(layer) is StaticLayer:
            layer.__class__ = OneTokenWriteLayer
    return cache
