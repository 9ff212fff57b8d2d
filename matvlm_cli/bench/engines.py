"""Decoding engines: one code path for the teacher and every hybrid, so comparisons are fair.

- `graphs`: a static cache (KV buffers for attention layers, conv window and SSM state buffers for
  Mamba layers, all allocated by the prefill and updated in place afterwards) and a decode step
  captured once as a CUDA graph, then replayed token after token with no Python or launch overhead.
  Greedy sampling, the attention mask and the positions advance inside the graph. On a CPU the same
  static-cache step runs eagerly.
- `hf`: plain `model.generate()` with its default dynamic cache, as users (and the paper's teacher
  baseline) run it.

Both engines run the same model code. `graphs` switches the language model's attention to
`kernels/attention.py`'s `matvlm_decode` (split-KV Triton decoding over the static cache, SDPA for prefill),
computes the projections that read the same input (q, k and v; gate and up; in a parallel block fc1 with
them) in one product, applies a tanh GELU that follows one of them (Phi's fc1) inside it, and runs
one-token products on `kernels/gemv.py` (`fusion.py`).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import StaticCache, StoppingCriteria, StoppingCriteriaList

from .. import kernels
from ..hybrid.conversion import attention_windows
from ..kernels.attention import DECODE_ATTENTION
from . import fusion
from .static_cache import new_static_cache


@dataclass
class BenchInputs:
    """A batch of prompts of exactly `seq_len` tokens, the image's tokens first, and every tensor the
    model's forward takes for the image (built by `models.bench_inputs` from the family's processor)."""

    input_ids: torch.Tensor  # (batch, seq_len)
    pixel_values: torch.Tensor | None  # as the processor gives them; None for text-only models
    # The image's tensors by forward keyword (pixel_values, image_grid_thw, image_sizes, pixel_attention_mask...)
    image: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-token tensors (batch, seq_len) by forward keyword: which tokens are the image's (mm_token_type_ids...)
    token_types: dict[str, torch.Tensor] = field(default_factory=dict)
    # The prompt's position ids where they are not 0..n-1 (M-RoPE: (3, batch, seq_len)), and the (batch, 1)
    # offset of a decoded token's position from its cache position
    position_ids: torch.Tensor | None = None
    position_offsets: torch.Tensor | None = None
    image_tokens: int = 0  # the image's tokens at the start of each row

    def model_inputs(self, start: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
        """The image's keywords for a forward over tokens start..end (the image's tensors in the one that
        starts the prompt)."""
        if start > 0:
            return {}
        end = self.input_ids.shape[1] if end is None else end
        return {**self.image, **{k: v[:, :end] for k, v in self.token_types.items()}}


@dataclass
class Timing:
    prefill_ms: float  # median time to first token
    decode_ms_per_token: float  # median per decode step (all sequences of the batch advance one token)
    peak_bytes: int | None  # weights + the most prefill and decode allocated on top of them; None on CPU
    kv_bytes: int  # attention KV buffers
    state_bytes: int  # Mamba conv windows + SSM states
    tokens: torch.Tensor  # the last run's generated tokens (batch, gen_len), for correctness checks
    prefill_runs_ms: list[float]  # every timed prefill, in order: the spread behind the median

    @classmethod
    def of(cls, prefill_s: list[float], decode_s: list[float], peak_bytes: int | None, kv_bytes: int,
           state_bytes: int, tokens: torch.Tensor) -> "Timing":
        """From each timed attempt's prefill and per-step decode, in seconds: medians in ms, and the prefills kept."""
        prefill_ms = [s * 1000 for s in prefill_s]
        return cls(statistics.median(prefill_ms), statistics.median(decode_s) * 1000, peak_bytes, kv_bytes,
                   state_bytes, tokens, prefill_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    """Starts a peak measurement; returns the bytes allocated now."""
    if device.type != "cuda":
        return 0
    # No empty_cache here: the first timed prefill would then pay for allocating its cache anew (about 90 ms
    # of cudaMalloc at 8k on an H200), and the peak counts allocated bytes, which empty_cache leaves as they are.
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _own_peak(model, device: torch.device, allocated_at_reset: int) -> int | None:
    """The model's weights plus the most the run allocated since the reset. Memory that earlier models
    of the process left behind (compiled graphs and their pools) is not this model's, so it is not
    counted: it would bias every model measured after the first."""
    if device.type != "cuda":
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + torch.cuda.max_memory_allocated(device) - allocated_at_reset


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def mamba_states(layer) -> list[torch.Tensor]:
    """A cache layer's conv windows and SSM states (dicts in newer transformers, lists in older)."""
    tensors = []
    for name in ("conv_states", "recurrent_states"):
        held = getattr(layer, name, None) or {}
        tensors += [t for t in (held.values() if isinstance(held, dict) else held) if isinstance(t, torch.Tensor)]
    return tensors


def _kv_tensors(layer) -> list[torch.Tensor]:
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]


def cache_sizes(cache) -> tuple[int, int]:
    """(KV bytes, Mamba state bytes) actually allocated in a cache's layers."""
    kv = state = 0
    for layer in cache.layers:
        kv += sum(t.numel() * t.element_size() for t in _kv_tensors(layer))
        state += sum(t.numel() * t.element_size() for t in mamba_states(layer))
    return kv, state


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a cache holds, layer by layer in a fixed order: KV slots, Mamba states, and the
    length counters of sliding layers (the only ones without a batch dimension)."""
    tensors = []
    for layer in cache.layers:
        tensors += _kv_tensors(layer) + mamba_states(layer)
        length = getattr(layer, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            tensors.append(length)
    return tensors


# Tokens per prefill forward: bounds activation memory, so peaks measure the caches. On an H200 the teacher's
# 8k prefill took 181 ms in chunks of 2048, 168 in chunks of 4096 and 147 in one forward of 8192 (stock
# transformers: 150), as each chunk's attention over the cache runs at a fraction of one causal call's rate
# (docs/results/bench/prefill-h200.json).
PREFILL_CHUNK = 8192


class GraphEngine:
    """Static cache + compiled, CUDA-graph decoding (eager static decoding on CPU)."""

    name = "graphs"

    def __init__(self, model, prefill_chunk: int = PREFILL_CHUNK, compile: bool = True):
        self.model = model
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda"
        self.prefill_chunk = prefill_chunk
        self.text_config = model.config.get_text_config(decoder=True)
        # Sliding-window layers keep only their window in the static cache, so one 4-D mask over every
        # slot fits none of them: such models get a 2-D padding mask, from which transformers builds each
        # layer kind's own mask inside the step.
        self.per_layer_masks = any(window is not None for window in attention_windows(self.text_config))
        self.residual_fold = None  # the compiled step's add folding (bench/residual_fold.py), once compiled
        if self.use_graphs and compile:
            self.compile_step()
        self.takes_cache_position = _accepts(model, "cache_position")
        self.cache_keyword = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in 5.2x
        # Like generate(min_new_tokens=...): every run decodes exactly gen_len tokens.
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos = torch.tensor(eos, dtype=torch.long, device=self.device)

    def compile_step(self):
        """Compile the decode step. It is ~30 tiny kernels per layer (norms, rotary, activations,
        residuals); inductor fuses them, the CUDA graph then removes launch gaps. One compile per model and
        shape family. The residual adds go into the GEMV before them (`bench/residual_fold.py`, whose
        `uuid` is also what keeps inductor's cache from loading a step built against older kernels), and on
        Hopper inductor's kernels launch with PDL too (kernels.pdl), so every kernel of the step overlaps
        its start with the end of the one before."""
        import torch._inductor.config as inductor_config

        from .residual_fold import ResidualFold

        torch._dynamo.reset()
        kernels.resolved()  # import the kernel backends now: an import inside the trace breaks the graph
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.residual_fold = ResidualFold()
        options = {"post_grad_custom_post_pass": self.residual_fold}
        if kernels.pdl(self.device) and hasattr(inductor_config.triton, "enable_pdl"):
            options["triton.enable_pdl"] = True
        self._next_token = torch.compile(self._next_token, dynamic=True, options=options)

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) -> (batch, 1) greedy tokens, end-of-sequence excluded."""
        return logits.index_fill(-1, self.eos, float("-inf")).argmax(-1, keepdim=True)

    def new_cache(self, max_len: int) -> StaticCache:
        """An empty static cache of `max_len` slots (its layers are allocated by the first forward), whose
        full-attention layers write a decoding token in one kernel (bench/static_cache.py)."""
        return new_static_cache(self.model.config, max_len)

    def forward(self, cache, **inputs):
        # transformers < 5.2x positions static caches with cache_position; later versions track it inside
        if not self.takes_cache_position:
            inputs.pop("cache_position")
        return self.model(**{self.cache_keyword: cache}, use_cache=True, **inputs)

    def _next_token(self, cache, input_ids, attention_mask, position_ids, cache_position):
        out = self.forward(
            cache, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache_position=cache_position,
        )
        return self._greedy(out.logits[:, -1])

    @torch.no_grad()
    def prefill(self, inputs: BenchInputs, max_len: int):
        """Fill a fresh static cache with the prompt, `prefill_chunk` tokens per forward (the image in
        the first); returns (cache, first generated token)."""
        self.text_config._attn_implementation = DECODE_ATTENTION  # the hf engine may have switched it
        fusion.fuse(self.model)  # and unfused the projections
        ids = inputs.input_ids
        batch, length = ids.shape
        cache = self.new_cache(max_len)
        chunk = self.prefill_chunk
        # the first chunk holds the whole image (its features are scattered in one forward)
        bounds = [0, *range(max(chunk, inputs.image_tokens), length, chunk), length]
        for start, end in zip(bounds, bounds[1:]):
            positions = torch.arange(start, end, device=self.device)
            position_ids = positions.unsqueeze(0).expand(batch, -1) if inputs.position_ids is None else inputs.position_ids[..., start:end]
            out = self.forward(
                cache, input_ids=ids[:, start:end], position_ids=position_ids, cache_position=positions, logits_to_keep=1,
                **inputs.model_inputs(start, end),
            )
        return cache, self._greedy(out.logits[:, -1])[:, 0]

    @torch.no_grad()
    def decoder(self, cache, first_token: torch.Tensor, position: int, max_len: int, gen_len: int,
                position_offsets: torch.Tensor | None = None):
        """(advance, tokens): each `advance()` moves every sequence one greedy token on (a replayed
        CUDA graph on GPU) and writes it into `tokens` (batch, gen_len), whose column 0 is `first_token`.
        `position_offsets` (batch, 1): a decoded token's position minus its cache position (M-RoPE)."""
        batch = first_token.shape[0]
        tokens = torch.zeros(batch, gen_len, dtype=torch.long, device=self.device)
        tokens[:, 0] = first_token
        count = torch.ones(1, dtype=torch.long, device=self.device)
        cache_position = torch.tensor([position], device=self.device)
        shape = (batch, max_len) if self.per_layer_masks else (batch, 1, 1, max_len)
        mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        mask[..., :position] = True

        def step():
            mask.index_fill_(-1, cache_position, True)
            position_ids = cache_position.expand(batch, 1)
            if position_offsets is not None:
                position_ids = position_ids + position_offsets
            token = self._next_token(cache, tokens.index_select(1, count - 1), mask, position_ids, cache_position)
            tokens.index_copy_(1, count, token)
            cache_position.add_(1)
            count.add_(1)

        def rewind():
            cache_position.fill_(position)
            count.fill_(1)
            mask[..., position:] = False

        if not self.use_graphs:
            return step, tokens
        # Warm up on a side stream (CUDA graph capture requires it), then undo what the warm-up
        # changed; cache slots it wrote are overwritten by the real steps.
        saved = self._snapshot(cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(cache, saved)
        rewind()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        self._restore(cache, saved)
        rewind()
        advance = graph.replay
        return advance, tokens

    @staticmethod
    def _in_place_state(cache) -> list[torch.Tensor]:
        """What a decode step updates in place besides KV slots: Mamba states and static lengths."""
        tensors = []
        for layer in cache.layers:
            tensors += mamba_states(layer)
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                tensors.append(length)
        return tensors

    def _snapshot(self, cache) -> list[torch.Tensor]:
        return [t.clone() for t in self._in_place_state(cache)]

    def _restore(self, cache, saved: list[torch.Tensor]) -> None:
        for target, copy in zip(self._in_place_state(cache), saved):
            target.copy_(copy)

    @torch.no_grad()
    def run(self, inputs: BenchInputs, gen_len: int, repeats: int = 3, warmup: int = 1) -> Timing:
        """Prefill then decode `gen_len` tokens, `warmup` + `repeats` times; medians of the repeats."""
        length = inputs.input_ids.shape[1]
        max_len = length + gen_len
        prefill_s, decode_s = [], []
        for attempt in range(warmup + repeats):
            if attempt == warmup:
                allocated_at_reset = _reset_peak(self.device)  # compilation and autotuning happen in the warm-up
            _sync(self.device)
            start = time.perf_counter()
            cache, first = self.prefill(inputs, max_len)
            _sync(self.device)
            prefill_time = time.perf_counter() - start
            advance, tokens = self.decoder(cache, first, length, max_len, gen_len, inputs.position_offsets)
            _sync(self.device)
            start = time.perf_counter()
            for _ in range(gen_len - 1):
                advance()
            _sync(self.device)
            if attempt >= warmup:
                prefill_s.append(prefill_time)
                decode_s.append((time.perf_counter() - start) / max(gen_len - 1, 1))
            kv, state = cache_sizes(cache)
            del cache, advance
        peak = _own_peak(self.model, self.device, allocated_at_reset)
        return Timing.of(prefill_s, decode_s, peak, kv, state, tokens)


class HFEngine:
    """Plain `generate()`: dynamic cache, one Python-driven forward per token."""

    name = "hf"

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.text_config = model.config.get_text_config(decoder=True)

    @torch.no_grad()
    def _generate(self, inputs: BenchInputs, new_tokens: int, clock: "_TokenClock"):
        kwargs = inputs.model_inputs()  # generate() positions M-RoPE itself from the token types
        return self.model.generate(
            input_ids=inputs.input_ids, attention_mask=torch.ones_like(inputs.input_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([clock]), **kwargs,
        )

    def run(self, inputs: BenchInputs, gen_len: int, repeats: int = 3, warmup: int = 1) -> Timing:
        """One generate() per attempt, timed at each token it produces: prefill is the time to the first
        token, decode the mean time of the tokens after it, so neither depends on a difference of two runs."""
        self.text_config._attn_implementation = "sdpa"
        fusion.unfuse(self.model)
        prefill_s, decode_s = [], []
        for attempt in range(warmup + repeats):
            if attempt == warmup:
                allocated_at_reset = _reset_peak(self.device)
            clock = _TokenClock(self.device)
            _sync(self.device)
            clock.start = time.perf_counter()
            out = self._generate(inputs, gen_len, clock)
            if attempt >= warmup:
                prefill_s.append(clock.stamps[0] - clock.start)
                decode_s.append((clock.stamps[-1] - clock.stamps[0]) / max(len(clock.stamps) - 1, 1))
        peak = _own_peak(self.model, self.device, allocated_at_reset)
        kv, state = cache_sizes(out.past_key_values)
        tokens = out.sequences[:, inputs.input_ids.shape[1] :]
        return Timing.of(prefill_s, decode_s, peak, kv, state, tokens)


class _TokenClock(StoppingCriteria):
    """Never stops generation; records when each token is out (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.stamps = device, 0.0, []

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


ENGINES = {"graphs": GraphEngine, "hf": HFEngine}
