"""The chunked SSD scan and the decoding step against a naive token-by-token recurrence."""

import pytest
import torch
import torch.nn.functional as F

from matvlm_cli.hybrid.ssd import causal_conv1d, causal_conv1d_step, ssd_chunk_scan, ssd_naive, ssd_step


def random_inputs(batch, length, heads, headdim, groups, d_state, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, headdim, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(batch, length, heads, generator=g, dtype=dtype) - 1)
    A = -torch.rand(heads, generator=g, dtype=dtype) * 4 - 0.5
    B = torch.randn(batch, length, groups, d_state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, groups, d_state, generator=g, dtype=dtype)
    D = torch.randn(heads, generator=g, dtype=dtype)
    return x, dt, A, B, C, D


@pytest.mark.parametrize(
    "batch,length,heads,headdim,groups,d_state,chunk",
    [
        (2, 64, 4, 8, 4, 16, 16),  # exact multiple of the chunk
        (1, 37, 4, 8, 2, 8, 16),  # ragged length, ngroups < nheads
        (3, 5, 6, 4, 1, 8, 8),  # shorter than one chunk, a single group
        (2, 100, 8, 16, 4, 16, 32),
    ],
)
def test_chunked_scan_equals_recurrence(batch, length, heads, headdim, groups, d_state, chunk):
    x, dt, A, B, C, D = random_inputs(batch, length, heads, headdim, groups, d_state)
    y, final = ssd_chunk_scan(x, dt, A, B, C, chunk, D=D)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, D=D)
    assert torch.allclose(y, y_ref, atol=1e-9, rtol=1e-9)
    assert torch.allclose(final, final_ref, atol=1e-9, rtol=1e-9)


def test_initial_state_continues_a_sequence():
    x, dt, A, B, C, D = random_inputs(2, 50, 4, 8, 2, 8, seed=3)
    y_full, final_full = ssd_chunk_scan(x, dt, A, B, C, 16, D=D)
    y1, state = ssd_chunk_scan(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], 16, D=D)
    y2, final = ssd_chunk_scan(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], 16, D=D, initial_states=state)
    assert torch.allclose(torch.cat([y1, y2], 1), y_full, atol=1e-9)
    assert torch.allclose(final, final_full, atol=1e-9)


def test_step_equals_recurrence():
    x, dt, A, B, C, D = random_inputs(2, 12, 6, 4, 3, 8, seed=5)
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, D=D)
    state = torch.zeros(2, 6, 4, 8, dtype=torch.float64)
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(12)]
    assert torch.allclose(torch.stack(ys, 1), y_ref, atol=1e-10)
    assert torch.allclose(state, final_ref, atol=1e-10)


def test_float32_scan_is_close_to_float64():
    x, dt, A, B, C, D = random_inputs(1, 300, 4, 8, 4, 8, seed=7)
    y64, _ = ssd_chunk_scan(x, dt, A, B, C, 64, D=D)
    y32, _ = ssd_chunk_scan(*(t.float() for t in (x, dt, A, B, C)), 64, D=D.float())
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), y64, atol=1e-4, rtol=1e-4)


def test_conv_step_equals_causal_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    full = causal_conv1d(x, weight, bias)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    steps = torch.stack([causal_conv1d_step(x[:, :, t], state, weight, bias) for t in range(9)], -1)
    assert torch.allclose(steps, full, atol=1e-12)
    assert torch.equal(state, x[:, :, -4:])
