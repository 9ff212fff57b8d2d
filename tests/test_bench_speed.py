"""The bench's prefill attention over filled slots, the largest-batch search and its cache replication,
and the decode-step profile, on the CPU (the GPU runs them in `experiments/gpu/h200_bench.sh`)."""

import math

import pytest
import torch
import torch.nn.functional as F

from matvlm_cli.bench.engines import GraphEngine, cache_tensors
from matvlm_cli.bench.models import bench_inputs, build_teacher, image_input
from matvlm_cli.bench.profile import profile_decode, profile_table
from matvlm_cli.bench.throughput import largest_fitting, replicate
from matvlm_cli.hybrid import choose_layers, convert_to_hybrid
from matvlm_cli.kernels import attention

CPU = torch.device("cpu")


def static_causal_mask(batch, start, q_len, slots):
    """The mask transformers builds for a prefill chunk of `q_len` tokens at `start` in a static cache."""
    positions = torch.arange(start, start + q_len)
    mask = torch.arange(slots)[None, :] <= positions[:, None]
    return mask[None, None].expand(batch, 1, q_len, slots)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_prefill_attention_over_filled_slots_equals_masked_sdpa(heads, kv_heads, monkeypatch):
    def full_sdpa(*args, **kwargs):
        raise AssertionError("a plain causal chunk took the SDPA path over every slot")

    monkeypatch.setattr(attention, "sdpa_attention_forward", full_sdpa)
    g = torch.Generator().manual_seed(0)
    batch, start, q_len, slots, dim = 2, 37, 24, 100, 16
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, slots, dim, generator=g) for _ in range(2))
    mask = static_causal_mask(batch, start, q_len, slots)
    assert attention.causal_prefix(mask) == start + q_len
    out, _ = attention.decode_attention(None, q, k, v, mask, scaling=dim**-0.5)
    rep = heads // kv_heads
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    assert out.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(out, reference.transpose(1, 2))


def test_prefill_attention_leaves_other_masks_to_sdpa():
    batch, start, q_len, slots = 2, 37, 24, 100
    padded = static_causal_mask(batch, start, q_len, slots).clone()
    padded[1, :, :, :3] = False  # a left-padded row
    bidirectional = static_causal_mask(1, start, q_len, slots).clone()
    bidirectional[..., :4, start : start + 4] = True  # an image block that sees itself both ways
    windowed = static_causal_mask(1, start, q_len, slots).clone()
    windowed[..., :5] = False  # a sliding window that has moved on
    for mask in (padded, bidirectional, windowed):
        assert attention.causal_prefix(mask) is None
    # the answer is kept for the mask object that every layer of a forward shares, not for a new one
    plain = static_causal_mask(batch, start, q_len, slots)
    assert attention.causal_prefix(plain) == start + q_len
    assert attention.causal_prefix(padded) is None


def test_largest_fitting_finds_the_boundary_in_few_attempts():
    for capacity in (1, 2, 37, 38, 1000):
        calls = []

        def fits(batch):
            calls.append(batch)
            return batch * 10 if batch <= capacity else None

        # a close estimate, one that is too high, and a limit that is the batch just past the capacity
        for first, limit in ((capacity, capacity + 1), (int(capacity * 1.3) + 2, 2 * capacity + 3), (capacity, 10 * capacity + 1)):
            calls.clear()
            search = largest_fitting(fits, first, limit, attempts=20)
            assert search.batch == capacity and search.result == capacity * 10
            assert [b for b, _ in search.tried] == calls and len(calls) <= 4 + math.ceil(math.log2(limit))
            if limit == capacity + 1:  # the estimate the bench makes when only the caches need memory: one attempt
                assert calls == [capacity]
    never = largest_fitting(lambda batch: None, 50, 51, attempts=6)
    assert never.batch == 0 and never.result is None and len(never.tried) == 6


@pytest.mark.parametrize("ratio", [None, 0.5])
def test_a_replicated_cache_decodes_each_row_like_the_prompt_alone(tiny_teachers, ratio):
    """Throughput mode prefills one prompt and copies its cache into every row: each row then decodes
    exactly the tokens the prompt decodes alone, Mamba states included."""
    model = build_teacher(str(tiny_teachers["llama"]), CPU, torch.float32)
    if ratio:
        convert_to_hybrid(model, choose_layers(4, ratio=ratio))
    engine = GraphEngine(model)
    inputs = bench_inputs(model, 90, 1, image_input(model))
    length, gen_len = 90, 8
    max_len = length + gen_len

    alone, first = engine.prefill(inputs, max_len)
    advance, tokens = engine.decoder(alone, first, length, max_len, gen_len)
    for _ in range(gen_len - 1):
        advance()
    expected = tokens[0].clone()

    one, first = engine.prefill(inputs, max_len)
    many, firsts = replicate(engine, [t.clone() for t in cache_tensors(one)], first, 3, max_len, text_token=int(inputs.input_ids[0, -1]))
    assert all(t.shape[0] == 3 for t in cache_tensors(many) if t.dim() > 1)
    # keys and values of each attention layer, or conv window and SSM state of each Mamba layer
    assert sum(t.dim() > 1 for t in cache_tensors(many)) == 2 * 4
    advance, tokens = engine.decoder(many, firsts, length, max_len, gen_len)
    for _ in range(gen_len - 1):
        advance()
    assert tokens.shape == (3, gen_len)
    assert all(torch.equal(row, expected) for row in tokens)


def test_decode_profile_counts_ops_per_step(tiny_teachers):
    model = build_teacher(str(tiny_teachers["llama"]), CPU, torch.float32)
    convert_to_hybrid(model, choose_layers(4, ratio=0.5))
    entry = profile_decode(GraphEngine(model), bench_inputs(model, 60, 1, image_input(model)), steps=3)
    assert entry["layers"] == 4 and entry["mamba_layers"] == 2 and entry["steps"] == 3
    names = [k["name"] for k in entry["kernels"]]
    assert "aten::mm" in names or "aten::addmm" in names
    assert entry["kernel_ms_per_step"] > 0 and entry["kernels_per_step"] >= len(entry["kernels"])
    table = profile_table({**entry, "model": "hybrid-0.5"})
    assert table.startswith("hybrid-0.5: one decode step at 60 tokens") and "2 attention, 2 Mamba" in table
