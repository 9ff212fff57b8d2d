"""`bench --throughput N`: the largest batch a model decodes at N tokens of context, and its tokens/s.

At large batch a decode step reads mostly KV cache, so how many sequences fit is where a hybrid gains.
The search is built to take a minute or two per model and length:

- One prompt is prefilled at batch 1, its cache is kept in host memory, and it is copied into every row
  of a batch-B cache, as a server prefills requests one at a time and decodes them together. Prefilling
  B prompts at once would cost B prefills per attempt (minutes at 32k) and time nothing that the
  throughput number contains.
- The batch-1 cache gives the bytes one sequence holds (KV slots and Mamba states, exactly as allocated;
  the states count twice, as capturing the graph snapshots them). The first batch tried is the most
  whose caches fit in free memory with `HEADROOM` to spare for the decode step's activations and its
  CUDA graph; bisection below it follows only if that does not fit.
- Each attempt captures the decode step at its batch and times `GEN_LEN` tokens. The compiled step
  compiles once more for a batch other than 1 (dynamic shapes), on the first attempt.

A model that cannot prefill one prompt at N tokens gets a row saying so; the other rows are still written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

import torch

from .engines import GraphEngine, cache_sizes, cache_tensors

GEN_LEN = 32  # tokens decoded per attempt
HEADROOM = 2**30  # bytes left free beside the caches: decode activations, the graph's pool, fragmentation
MAX_ATTEMPTS = 6

Result = TypeVar("Result")


@dataclass
class ThroughputRow:
    model: str
    seq_len: int
    max_batch: int = 0  # 0: not even one sequence fits
    decode_ms: float | None = None  # per step at max_batch (every sequence gains one token)
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    cache_mib_per_sequence: float | None = None  # KV + Mamba state one sequence holds
    attempts: list[list[int]] = field(default_factory=list)  # [batch, 1 if it fitted else 0], in the order tried
    search_s: float | None = None  # the whole search: prefill, compile, attempts
    error: str | None = None


@dataclass
class Search(Generic[Result]):
    batch: int  # largest batch that fitted (0: none)
    result: Result | None
    tried: list[tuple[int, bool]]


def largest_fitting(fits: Callable[[int], Result | None], first: int, limit: int, attempts: int = MAX_ATTEMPTS) -> Search:
    """The largest batch b < `limit` for which `fits(b)` is not None, starting at `first`. `limit` is known
    not to fit; `fits` is monotone (fewer sequences need less memory). While nothing has fitted, each try
    is 10 % lower than the last (an estimate is usually close), from the third on half; then bisection."""
    low, low_result, high = 0, None, limit
    batch = max(1, min(first, limit - 1))
    tried: list[tuple[int, bool]] = []
    while len(tried) < attempts and low < batch < high:
        result = fits(batch)
        tried.append((batch, result is not None))
        if result is not None:
            low, low_result = batch, result
        else:
            high = batch
        if high - low <= 1:
            break
        if low:
            batch = (low + high) // 2
        else:
            batch = max(1, min(int(batch * 0.9) if len(tried) < 3 else batch // 2, batch - 1))
    return Search(low, low_result, tried)


def replicate(engine: GraphEngine, prompt: list[torch.Tensor], first_token: torch.Tensor, batch: int, max_len: int,
              text_token: int):
    """A batch-`batch` static cache whose every row holds `prompt` (`cache_tensors` of a batch-1 cache, on
    any device), and the first generated token for each row. The rows are allocated by the model itself (a
    forward of `text_token` at position 0, which lazily builds every layer's slots and states), then
    overwritten: row 0 from `prompt`, the others from row 0 on the device."""
    cache = engine.new_cache(max_len)
    filler = first_token.new_full((batch, 1), text_token)
    position = torch.zeros(1, dtype=torch.long, device=first_token.device)
    engine.forward(cache, input_ids=filler, position_ids=position.expand(batch, 1), cache_position=position, logits_to_keep=1)
    targets = cache_tensors(cache)
    if len(prompt) != len(targets):
        raise RuntimeError(f"cache layouts differ: {len(prompt)} tensors at batch 1, {len(targets)} at batch {batch}")
    for source, target in zip(prompt, targets):
        if source.shape == target.shape:  # no batch dimension (a layer's length counter), or batch 1
            target.copy_(source)
        else:
            target[:1].copy_(source)
            target[1:].copy_(target[:1].expand_as(target[1:]))
    return cache, first_token[:1].expand(batch).contiguous()


def _free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def largest_batch(engine: GraphEngine, label: str, inputs, seq_len: int, device: torch.device) -> ThroughputRow:
    """Search the largest batch at `seq_len` tokens (`inputs`: one prompt of that length) and time it."""
    row = ThroughputRow(label, seq_len)
    started = time.perf_counter()
    max_len = seq_len + GEN_LEN
    _release(device)
    one = None
    try:
        one, first = engine.prefill(inputs, max_len)
    except torch.cuda.OutOfMemoryError:
        pass
    if one is None:  # released here, not in the except block, whose traceback holds the partial cache
        _release(device)
        row.error = f"cannot fit even batch 1 at {seq_len} tokens: its prefill runs out of memory"
        row.search_s = time.perf_counter() - started
        return row
    kv, state = cache_sizes(one)
    row.cache_mib_per_sequence = (kv + state) / 2**20
    per_sequence = kv + 2 * state  # building the graph snapshots the Mamba states (`GraphEngine.decoder`)
    prompt = [t.to("cpu") for t in cache_tensors(one)]  # in host memory, so the batch has the GPU to itself
    del one
    _release(device)
    free = _free_bytes(device) - HEADROOM
    limit = max(free // per_sequence, 1) + 1  # a batch whose caches alone exceed the free memory cannot fit
    text_token = int(inputs.input_ids[0, -1])  # the prompt's last token is text: a forward of it needs no image

    def fits(batch: int):
        cache = advance = None
        try:
            _release(device)
            torch.cuda.reset_peak_memory_stats(device)
            cache, firsts = replicate(engine, prompt, first, batch, max_len, text_token)
            offsets = None if inputs.position_offsets is None else inputs.position_offsets[:1].expand(batch, -1)
            advance, _ = engine.decoder(cache, firsts, seq_len, max_len, GEN_LEN, offsets)
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(GEN_LEN - 1):
                advance()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / (GEN_LEN - 1), torch.cuda.max_memory_allocated(device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            # cuBLAS reports a failed workspace allocation as a RuntimeError, not an OutOfMemoryError
            if not isinstance(err, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(err):
                raise
            return None
        finally:
            del cache, advance

    search = largest_fitting(fits, limit - 1, limit)
    prompt.clear()  # the host copies go now, not when the caller's frame ends
    _release(device)
    row.attempts = [[batch, int(fitted)] for batch, fitted in search.tried]
    row.search_s = time.perf_counter() - started
    if search.result is None:
        batch_one_failed = any(batch == 1 for batch, _ in search.tried)
        row.error = (f"cannot fit even batch 1 at {seq_len} tokens: decoding runs out of memory" if batch_one_failed
                     else f"no batch fitted at {seq_len} tokens in {len(search.tried)} attempts")
        return row
    ms, peak = search.result
    row.max_batch, row.decode_ms, row.tokens_per_s = search.batch, ms, search.batch * 1000 / ms
    row.peak_gib = peak / 2**30
    return row
