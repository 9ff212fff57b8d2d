"""GPU checks: each kernel backend (mamba_ssm / causal_conv1d, fla) agrees with the fp32 PyTorch
reference within 1e-2 relative error in bf16, forward, step and backward; and a hybrid generates the same
tokens with and without its cache on CUDA. Skipped without a GPU. matvlm's own Triton kernels are checked in
test_triton_kernels.py, which also runs without a GPU (in Triton's interpreter)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from matvlm_cli import kernels
from matvlm_cli.hybrid import Mamba2Config, Mamba2Mixer
from matvlm_cli.hybrid.ssd import causal_conv1d, causal_conv1d_step, ssd_chunk_scan, ssd_step

pytestmark = pytest.mark.cuda


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(params=["mamba-ssm", "fla"])
def torch_backend(request):
    """Selects a kernel backend (skipping when it does not import); calling it switches to the reference."""
    if kernels.backend_ops(request.param) is None:
        pytest.skip(f"{request.param} not installed")
    kernels.set_backend(request.param)
    yield lambda: kernels.set_backend("torch")
    kernels.set_backend("auto")


def inputs(batch=2, length=1000, heads=8, headdim=32, groups=8, d_state=32, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, length, heads, headdim, device="cuda", generator=g)
    dt = F.softplus(torch.randn(batch, length, heads, device="cuda", generator=g) - 2)
    A = -torch.rand(heads, device="cuda", generator=g) * 4 - 0.5
    B = torch.randn(batch, length, groups, d_state, device="cuda", generator=g) / d_state**0.5
    C = torch.randn(batch, length, groups, d_state, device="cuda", generator=g) / d_state**0.5
    D = torch.randn(heads, device="cuda", generator=g)
    return [t.to(dtype) for t in (x, B, C)], dt, A, D


def test_chunk_scan_kernel_matches_fp32_reference(torch_backend):
    (x, B, C), dt, A, D = inputs()
    y, final = ssd_chunk_scan(x, dt, A, B, C, 256, D=D)
    torch_backend()
    y_ref, final_ref = ssd_chunk_scan(x.float(), dt, A, B.float(), C.float(), 256, D=D)
    assert rel_err(y, y_ref) < 1e-2 and rel_err(final, final_ref) < 1e-2


def test_chunk_scan_kernel_backward_matches_reference(torch_backend):
    if not kernels.trains(kernels.get_backend()):
        pytest.skip(f"{kernels.get_backend()} refuses backward on this GPU/Triton (fla #640); training passes it over")
    (x, B, C), dt, A, D = inputs(length=300)
    leaves = [t.float().requires_grad_() for t in (x, dt, B, C)]
    y, _ = ssd_chunk_scan(leaves[0].bfloat16(), leaves[1], A, leaves[2].bfloat16(), leaves[3].bfloat16(), 64, D=D)
    y.float().square().sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch_backend()
    y_ref, _ = ssd_chunk_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], 64, D=D)
    y_ref.square().sum().backward()
    for got, leaf in zip(grads, leaves):
        assert rel_err(got, leaf.grad) < 1e-2


def test_step_and_conv_kernels_match_reference(torch_backend):
    (x, B, C), dt, A, D = inputs(length=1)
    state = torch.randn(2, 8, 32, 32, device="cuda")
    ref_state = state.clone()
    y = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    conv_in = torch.randn(2, 64, 50, device="cuda", dtype=torch.bfloat16)
    weight, bias = torch.randn(64, 4, device="cuda", dtype=torch.bfloat16), torch.randn(64, device="cuda", dtype=torch.bfloat16)
    conv = causal_conv1d(conv_in, weight, bias)
    conv_state = conv_in[:, :, :4].clone()
    step = causal_conv1d_step(conv_in[:, :, 4], conv_state, weight, bias)
    torch_backend()
    y_ref = ssd_step(ref_state, x[:, 0].float(), dt[:, 0], A, B[:, 0].float(), C[:, 0].float(), D)
    conv_ref = causal_conv1d(conv_in.float(), weight.float(), bias.float())
    ref_conv_state = conv_in[:, :, :4].float().clone()
    step_ref = causal_conv1d_step(conv_in[:, :, 4].float(), ref_conv_state, weight.float(), bias.float())
    assert rel_err(y, y_ref) < 1e-2 and rel_err(state, ref_state) < 1e-2
    assert rel_err(conv, conv_ref) < 1e-2 and rel_err(step, step_ref) < 1e-2


def test_mixer_prefill_and_decode_on_cuda():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(Mamba2Config(d_model=128, nheads=8, headdim=16, d_state=16, ngroups=8), 0, device="cuda")
    hidden = torch.randn(2, 77, 128, device="cuda")
    full, _ = mixer(hidden)
    cache = DynamicCache()
    pieces = [mixer(hidden[:, :60], cache=cache)[0]]
    pieces += [mixer(hidden[:, t : t + 1], cache=cache)[0] for t in range(60, 77)]
    assert rel_err(torch.cat(pieces, 1), full) < 1e-3


def test_hybrid_generation_on_cuda(tiny_teachers):
    from test_generation import QUESTIONS, greedy, hybrid_of, inputs_for

    model = hybrid_of(tiny_teachers["llama"]).cuda()
    batch = inputs_for(tiny_teachers["llama"], QUESTIONS).to("cuda")
    cached, full = greedy(model, batch), greedy(model, batch, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)


@pytest.mark.parametrize("ratio", [None, 0.5])
def test_graph_engine_decodes_like_generate_on_cuda(tiny_teachers, ratio):
    """The bench's CUDA-graph decoding (static cache, Mamba states in static buffers, chunked prefill)
    produces the tokens plain generate() produces, for a teacher and a hybrid. Eager step: a random
    tiny model has near-ties that an inductor-fused step may resolve differently."""
    from matvlm_cli.bench.engines import GraphEngine, HFEngine
    from matvlm_cli.bench.models import bench_inputs, build_teacher, image_input
    from matvlm_cli.hybrid import choose_layers, convert_to_hybrid

    model = build_teacher(str(tiny_teachers["llama"]), torch.device("cuda"), torch.float32)
    if ratio:
        convert_to_hybrid(model, choose_layers(4, ratio=ratio))
    inputs = bench_inputs(model, 200, 2, image_input(model))
    graphs = GraphEngine(model, prefill_chunk=64, compile=False).run(inputs, 24, repeats=1)
    plain = HFEngine(model).run(inputs, 24, repeats=1)
    assert torch.equal(graphs.tokens, plain.tokens)
    assert graphs.kv_bytes > 0 and (graphs.state_bytes > 0) == bool(ratio)


def test_compiled_graph_engine_decodes_the_embedded_hybrid_like_generate_on_cuda():
    """The compiled step on a trained model (the embedded teacher's 0.5 hybrid): same tokens as generate()."""
    from matvlm_cli.bench.engines import GraphEngine, HFEngine
    from matvlm_cli.bench.models import bench_inputs, image_input, model_specs
    from matvlm_cli.paths import default_teacher_dir

    (spec,) = model_specs(str(default_teacher_dir()), [], [0.5], "even", torch.device("cuda"), torch.float32)[1:]
    model = spec.build()
    inputs = bench_inputs(model, 300, 2, image_input(model))
    graphs = GraphEngine(model).run(inputs, 24, repeats=1)
    assert torch.equal(graphs.tokens, HFEngine(model).run(inputs, 24, repeats=1).tokens)


@pytest.mark.parametrize("heads,kv_heads,dim,dtype", [(32, 32, 80, torch.bfloat16), (8, 2, 64, torch.bfloat16), (4, 4, 32, torch.float32)])
def test_prefill_chunk_attention_over_filled_slots_matches_masked_sdpa(heads, kv_heads, dim, dtype, monkeypatch):
    """A prefill chunk after the first, in a static cache: flash attention (efficient in float32) over the
    filled slots with the diagonal at the last key, against float32 SDPA with transformers' mask over every slot."""
    from matvlm_cli.kernels import attention

    def full_sdpa(*args, **kwargs):
        raise AssertionError("a plain causal chunk took the SDPA path over every slot")

    monkeypatch.setattr(attention, "sdpa_attention_forward", full_sdpa)
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, start, q_len, slots = 2, 2048, 1000, 8320
    q = torch.randn(batch, heads, q_len, dim, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, slots, dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    positions = torch.arange(start, start + q_len, device="cuda")
    mask = (torch.arange(slots, device="cuda")[None, :] <= positions[:, None])[None, None].expand(batch, 1, q_len, slots)
    out, _ = attention.decode_attention(None, q, k, v, mask, scaling=dim**-0.5)
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1), attn_mask=mask
    )
    assert out.shape == (batch, q_len, heads, dim) and out.dtype == dtype
    assert rel_err(out, ref.transpose(1, 2)) < (1e-2 if dtype == torch.bfloat16 else 1e-3)


def packed_seq_idx(lengths_per_row, total):
    seq_idx = torch.zeros(len(lengths_per_row), total, dtype=torch.int32, device="cuda")
    cu = [0]
    for row, lengths in enumerate(lengths_per_row):
        at = 0
        for i, n in enumerate(lengths + [total - sum(lengths)]):
            seq_idx[row, at : at + n] = i
            at += n
            if n:
                cu.append(row * total + at)
    return seq_idx, torch.tensor(cu, dtype=torch.int32, device="cuda")


PACKED = [[300, 251, 90], [700]]  # records crossing and ending inside chunks, one filling its row but the tail


def test_packed_chunk_scan_kernel_matches_the_reference_forward_and_backward(torch_backend):
    """seq_idx through a kernel backend's scan (the one training uses) against the fp32 reference."""
    (x, B, C), dt, A, D = inputs(length=800)
    seq_idx, _ = packed_seq_idx(PACKED, 800)
    if kernels.kernel("chunk_scan", x, needs_grad=True, packed=True) is None:
        pytest.skip(f"{kernels.get_backend()} has no packed training scan here (its rows would need flattening)")
    leaves = [t.float().requires_grad_() for t in (x, dt, B, C)]
    y, _ = ssd_chunk_scan(leaves[0].bfloat16(), leaves[1], A, leaves[2].bfloat16(), leaves[3].bfloat16(), 64, D=D, seq_idx=seq_idx)
    y.float().square().sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch_backend()
    y_ref, _ = ssd_chunk_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], 64, D=D, seq_idx=seq_idx)
    y_ref.square().sum().backward()
    assert rel_err(y, y_ref) < 1e-2
    for got, leaf in zip(grads, leaves):
        assert rel_err(got, leaf.grad) < 1e-2


def test_packed_conv_kernel_matches_the_reference_forward_and_backward(torch_backend):
    seq_idx, cu = packed_seq_idx(PACKED, 800)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 800, 96, device="cuda", generator=g).bfloat16().transpose(1, 2).requires_grad_()  # channels-last, as the mixer's
    weight = torch.randn(96, 4, device="cuda", generator=g).bfloat16()
    bias = torch.randn(96, device="cuda", generator=g).bfloat16()
    if kernels.kernel("conv1d", x, packed=True) is None:
        pytest.skip(f"{kernels.get_backend()} has no packed conv here")
    out = causal_conv1d(x, weight, bias, seq_idx, cu)
    out.float().square().sum().backward()
    grad, x.grad = x.grad.clone(), None
    torch_backend()
    ref = causal_conv1d(x.float(), weight.float(), bias.float(), seq_idx)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-2 and rel_err(grad, x.grad) < 1e-2


def test_packed_varlen_attention_matches_the_block_diagonal_reference():
    """hybrid.packed's GPU path (PyTorch's varlen flash attention) against its masked-SDPA path."""
    from matvlm_cli.hybrid import packed

    if packed.VARLEN is None:
        pytest.skip("no torch.nn.attention.varlen in this torch")
    seq_idx, cu = packed_seq_idx(PACKED, 800)
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 8, 800, 80, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(3))
    module = torch.nn.Module()
    out, _ = packed.attend_within_records(module, q, k, v, None, scaling=80**-0.5, seq_idx=seq_idx, cu_seq_lens_q=cu, max_length_q=800)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, _ = packed.attend_within_records(module, *leaves, None, scaling=80**-0.5, seq_idx=seq_idx, cu_seq_lens_q=cu, max_length_q=800)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-2
    for got, leaf in zip(grads, leaves):
        assert rel_err(got, leaf.grad) < 1e-2


def test_hopper_autotunes_the_training_kernels_over_their_shortlists_only():
    """On an H100/H200 the SSD and conv kernels that training uses autotune over kernels/autotune-sm90.json's
    configs (kernels/shortlists.py); the packed tests above check what those kernels compute."""
    import json
    import sys

    from matvlm_cli.kernels import shortlists

    if not shortlists.wanted():
        pytest.skip("not a Hopper GPU, or MATVLM_AUTOTUNE=full")
    x = torch.zeros(1, 8, 2, 4, device="cuda")
    if kernels.kernel("chunk_scan", x, needs_grad=True, packed=True) is None:
        pytest.skip(f"{kernels.get_backend()} has no packed training scan here")
    lists = json.loads(shortlists.SHORTLISTS.read_text())["kernels"]
    seen = {}
    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith(shortlists.MODULE_PREFIXES):
            seen |= dict(shortlists.autotuners_in(module))
    assert "_chunk_scan_fwd_kernel" in seen and "_chunk_scan_chunk_state_bwd_dx_kernel" in seen
    for kernel, tuner in seen.items():
        if kernel in lists:
            assert {str(c) for c in tuner.configs} <= set(lists[kernel]), kernel
