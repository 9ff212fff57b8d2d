"""The Mamba-2 mixer: parameter layout, cached decoding and padding."""

import torch
from transformers import DynamicCache

from matvlm_cli.hybrid import Mamba2Config, Mamba2Mixer


def make_mixer(seed=0, **overrides):
    torch.manual_seed(seed)
    config = Mamba2Config(**{"d_model": 32, "nheads": 4, "headdim": 8, "d_state": 8, "ngroups": 2, "chunk_size": 8} | overrides)
    mixer = Mamba2Mixer(config, layer_idx=0, dtype=torch.float64)
    with torch.no_grad():  # D and the norm weight away from their defaults, so they are exercised
        mixer.D.uniform_(0.5, 1.5)
        mixer.norm.weight.uniform_(0.5, 1.5)
    return mixer


def test_parameters_follow_mamba_ssm_names_and_shapes():
    mixer = make_mixer()
    c = mixer.config
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads, c.d_model),
        "conv1d.weight": (c.conv_dim, 1, c.d_conv),
        "conv1d.bias": (c.conv_dim,),
        "dt_bias": (c.nheads,),
        "A_log": (c.nheads,),
        "D": (c.nheads,),
        "norm.weight": (c.d_inner,),
        "out_proj.weight": (c.d_model, c.d_inner),
    }
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert torch.all((dt >= c.dt_init_floor - 1e-9) & (dt <= c.dt_max + 1e-9))
    assert torch.all((-torch.exp(mixer.A_log) <= -1) & (-torch.exp(mixer.A_log) >= -16))


def test_prefill_then_decode_equals_full_forward():
    mixer = make_mixer()
    hidden = torch.randn(2, 29, 32, dtype=torch.float64)
    full, _ = mixer(hidden)
    cache = DynamicCache()
    prefix, _ = mixer(hidden[:, :20], past_key_values=cache)
    steps = [mixer(hidden[:, t : t + 1], past_key_values=cache)[0] for t in range(20, 29)]
    assert torch.allclose(torch.cat([prefix, *steps], 1), full, atol=1e-10)


def test_prefill_shorter_than_conv_and_chunked_continuation():
    mixer = make_mixer(seed=1)
    hidden = torch.randn(1, 23, 32, dtype=torch.float64)
    full, _ = mixer(hidden)
    cache = DynamicCache()
    pieces = [mixer(hidden[:, :2], past_key_values=cache)[0]]  # 2 tokens < d_conv
    pieces.append(mixer(hidden[:, 2:13], past_key_values=cache)[0])  # a multi-token continuation
    pieces += [mixer(hidden[:, t : t + 1], past_key_values=cache)[0] for t in range(13, 23)]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-10)


def test_left_padding_does_not_leak_into_the_state():
    mixer = make_mixer(seed=2)
    real = torch.randn(1, 11, 32, dtype=torch.float64)
    garbage = torch.randn(1, 5, 32, dtype=torch.float64) * 100
    padded = torch.cat([garbage, real], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 11)], 1).long()
    alone_cache, padded_cache = DynamicCache(), DynamicCache()
    alone, _ = mixer(real, past_key_values=alone_cache)
    out, _ = mixer(padded, past_key_values=padded_cache, padding_mask=mask)
    assert torch.allclose(out[:, 5:], alone, atol=1e-10)
    # And the states carried into decoding agree too.
    token = torch.randn(1, 1, 32, dtype=torch.float64)
    assert torch.allclose(mixer(token, past_key_values=padded_cache)[0], mixer(token, past_key_values=alone_cache)[0], atol=1e-10)
    # Without the mask, the padding would have changed the result: the check above has teeth.
    unmasked, _ = mixer(padded)
    assert not torch.allclose(unmasked[:, 5:], alone, atol=1e-3)


def test_beam_reorder_moves_the_state_with_its_sequence():
    mixer = make_mixer(seed=3)
    hidden = torch.randn(2, 7, 32, dtype=torch.float64)
    cache = DynamicCache()
    mixer(hidden, past_key_values=cache)
    cache.reorder_cache(torch.tensor([1, 1]))
    token = torch.randn(1, 1, 32, dtype=torch.float64).expand(2, 1, 32)
    out, _ = mixer(token, past_key_values=cache)
    reference, _ = mixer(torch.cat([hidden[1:], token[:1]], 1))
    assert torch.allclose(out[0], reference[0, -1:], atol=1e-10)
    assert torch.allclose(out[1], reference[0, -1:], atol=1e-10)
