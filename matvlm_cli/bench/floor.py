"""The memory-bandwidth floor of one decode step, and what a model reads to take it.

A decode step at batch b must read every weight the language model uses once (the input embedding
only for b rows, the vision tower not at all), the attention layers' KV cache up to the context
length, and read and write each Mamba layer's state. Divided by the measured HBM bandwidth, that is
the fastest the step can possibly run; a report's "x floor" is measured time over that.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..hybrid.conversion import attention_windows, find_decoder, hybrid_layers
from ..hybrid.mamba2 import Mamba2Mixer


def measure_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    numel = int(gib * 2**30) // 4
    source = torch.empty(numel, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    times = []
    for attempt in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt >= 2:
            times.append(time.perf_counter() - start)
    del source, target
    return 2 * numel * 4 / statistics.median(times)


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode_weight_bytes(model: nn.Module, batch: int = 1) -> int:
    """Weight bytes one decode step reads: the language model (decoder layers, final norm, LM head),
    plus `batch` rows of the input embedding; no vision tower or connector."""
    layout = find_decoder(model)
    text_model = layout.text_model
    embedding = text_model.get_input_embeddings()
    head = model.get_output_embeddings()
    # The head is read in full (tied or not); the embedding only for the batch's rows.
    row = embedding.weight.shape[1] * embedding.weight.element_size()
    return _bytes(text_model) - _bytes(embedding) + (_bytes(head) if head is not None else 0) + batch * row


def kv_bytes(model: nn.Module, context: int, batch: int = 1, dtype_bytes: int | None = None) -> int:
    """KV-cache bytes of the attention layers at `context` tokens (in the model's dtype unless given). A
    sliding-window layer holds, and a decode step reads, at most its window (Gemma 2 and 3); a Mamba
    layer none."""
    dtype_bytes = dtype_bytes or next(model.parameters()).element_size()
    text_config = model.config.get_text_config(decoder=True)
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    mamba = set(hybrid_layers(model))
    slots = sum(min(context, window or context) for i, window in enumerate(attention_windows(text_config)) if i not in mamba)
    return 2 * kv_heads * head_dim * dtype_bytes * slots * batch


def state_bytes(model: nn.Module, batch: int = 1, conv_bytes: int | None = None) -> int:
    """The Mamba layers' decode state, from their configs: conv windows in the model's dtype (unless
    given) and fp32 SSM states, as the cache allocates them."""
    conv_bytes = conv_bytes or next(model.parameters()).element_size()
    layout = find_decoder(model)
    mixers = [layout.attention(i) for i in hybrid_layers(model)]
    return sum(m.config.state_bytes(batch, conv_bytes=conv_bytes) for m in mixers if isinstance(m, Mamba2Mixer))


def decode_floor(model: nn.Module, context: int, batch: int = 1) -> dict[str, int]:
    """What one decode step at `context` tokens must move, computed from the model's parameters' shapes
    and dtypes only (a model on the meta device will do): weights, KV, Mamba state, and their total."""
    weights, kv, state = decode_weight_bytes(model, batch), kv_bytes(model, context, batch), state_bytes(model, batch)
    return {"weight_bytes": weights, "kv_bytes": kv, "state_bytes": state, "total_bytes": floor_bytes(weights, kv, state)}


def floor_bytes(weights: int, kv: int, state: int) -> int:
    """Bytes a decode step moves at least: weights and KV read once, Mamba states read and written."""
    return weights + kv + 2 * state


def floor_ms(bytes_moved: int, bandwidth: float) -> float:
    return bytes_moved / bandwidth * 1000
