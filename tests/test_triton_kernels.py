"""matvlm's own Triton kernels against their PyTorch references: the one-token GEMV, split-KV decoding
attention with its combine, the fused Mamba-2 decode step, and the prefill's skip + gate + norm.

On the GPU machine they run compiled, on CUDA. Without a GPU, conftest.py sets TRITON_INTERPRET=1, so
Triton (which the Makefile installs beside the CPU torch) runs the same kernel code in its interpreter,
on the CPU: CI checks their maths, their masks and their grids. The interpreter has no programmatic
dependent launch, so `kernels.pdl` is off there; the PDL form runs in the GPU checks
(experiments/gpu/pdl_ab.sh). Shapes the size of Phi-2's run on CUDA only: the interpreter runs each
program in Python."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from matvlm_cli import kernels
from matvlm_cli.hybrid import Mamba2Config, Mamba2Mixer
from matvlm_cli.hybrid.ssd import causal_conv1d_step, ssd_step
from tests import zoo

pytest.importorskip("triton", reason="Triton is not installed (the Makefile installs it; CUDA torch brings it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels need TRITON_INTERPRET=1 (conftest.py sets it)", allow_module_level=True)
GPU_SIZED = pytest.mark.cuda  # CUDA only: skipped without a GPU (conftest.py)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def one_token_write(keys, values, key, value, length):
    """`cache_write.takes` without its CUDA condition: one sequence's one token, on any device."""
    return keys.shape[0] == 1 and key.shape[-2] == 1


def generator():
    return torch.Generator(device=DEVICE).manual_seed(0)


BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "out_features,in_features,bias,dtype,gelu",
    [
        *(pytest.param(out_features, in_features, bias, dtype, gelu, marks=GPU_SIZED)
          for dtype in (BF16, FP16) for out_features, in_features, bias, gelu in [
            (7680, 2560, True, False),  # Phi-2's q/k/v
            (2560, 10240, True, False),  # fc2
            (10272, 2560, False, False),  # a hybrid's in_proj, no bias
            (17920, 2560, True, True),  # Phi-2's q/k/v and fc1 as one product, with a GELU range
        ]),
        (100, 200, True, BF16, False),  # one row per program, a partial tile of columns
        (100, 200, True, FP16, True),
        (2200, 512, False, BF16, True),  # two rows per program, whole column tiles
        (9001, 256, True, FP16, False),  # eight rows per program, a partial last program
    ],
)
def test_one_token_gemv_matches_float32_linear(out_features, in_features, bias, dtype, gelu):
    """The graphs engine's GEMV kernel against F.linear in float32, for tile shapes from one to eight rows
    per program and inputs that are and are not a whole number of column tiles; with `gelu`, the tanh
    GELU on a range of rows that starts and ends inside a program's rows, against PyTorch's."""
    from matvlm_cli.kernels import gemv

    g = generator()
    x = torch.randn(1, 1, in_features, device=DEVICE, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, device=DEVICE, generator=g) * 0.02).to(dtype)
    b = torch.randn(out_features, device=DEVICE, generator=g).to(dtype) if bias else None
    rows = (out_features // 3 + 1, out_features - 3) if gelu else (0, 0)
    out = gemv.gemv(x, w, b, *rows)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    ref[..., rows[0] : rows[1]] = F.gelu(ref[..., rows[0] : rows[1]], approximate="tanh")
    assert out.shape == (1, 1, out_features) and out.dtype == dtype
    assert rel_err(out, ref) < 1e-2
    if gelu:  # rows outside the range are the plain product; those inside match PyTorch's GELU
        assert torch.equal(out[..., : rows[0]], gemv.gemv(x, w, b)[..., : rows[0]])
        assert rel_err(out[..., rows[0] : rows[1]], ref[..., rows[0] : rows[1]]) < 1e-2
    residual = torch.randn(out.shape, device=DEVICE, generator=g).to(dtype)  # added after the GELU, before the store
    assert rel_err(gemv.gemv(x, w, b, *rows, residual=residual), ref + residual.float()) < 1e-2
    # the loop pipelined through shared memory (experiments/gpu/gemv_probe.py sweeps it): the same sums, in the
    # same order, so the same bits
    tile = gemv.tiles(out_features, in_features, gemv.sm_count(x.device))._replace(stages=3)
    assert torch.equal(gemv.launch(gemv._gemv_kernel, x, w, b, *rows, tile=tile), out)
    if DEVICE == "cuda":  # `linear` routes one CUDA token to the kernel, anything else to F.linear
        assert torch.equal(gemv.linear(x, w, b), gemv.gemv(x, w, b))
        two_tokens = torch.cat([x, x], dim=1)
        torch.testing.assert_close(gemv.linear(two_tokens, w, b), F.linear(two_tokens, w, b))


def _norms(width: int):
    """A layer norm with a shift, an RMS norm, and Gemma's RMS norm of scale 1 + weight: real modules, random
    gains (and shift)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    norms = {"layer": torch.nn.LayerNorm(width, eps=1e-5), "rms": LlamaRMSNorm(width, eps=1e-6), "gemma": Gemma3RMSNorm(width, eps=1e-6)}
    with torch.no_grad():
        for norm in norms.values():
            norm.weight.copy_(torch.rand(width, generator=g) + 0.5 - (1.0 if norm is norms["gemma"] else 0.0))
        norms["layer"].bias.copy_(torch.randn(width, generator=g) * 0.1)
    return norms


@pytest.mark.parametrize(
    "out_features,in_features,norm,dtype,gelu",
    [
        *(pytest.param(*shape, BF16, False, marks=GPU_SIZED) for shape in [(17920, 2560, "layer"), (7680, 2560, "rms")]),
        (100, 200, "layer", BF16, False),  # a partial tile of columns (one row per program, as below)
        (100, 200, "rms", FP16, False),
        (120, 1024, "gemma", BF16, True),  # two whole column tiles
        (120, 1024, "layer", FP16, True),
    ],
)
def test_one_token_gemv_normalises_its_raw_input_like_the_norm(out_features, in_features, norm, dtype, gelu):
    """The GEMV given the raw input of the norm before it (bench/folds.py): a layer norm with a shift, an RMS
    norm, Gemma's RMS norm of 1 + weight, each recognised from the module by what it computes, against the
    norm then F.linear in float32. The input has a mean far from 0, as a residual stream may."""
    from matvlm_cli.bench import folds
    from matvlm_cli.kernels import gemv

    g = generator()
    module = _norms(in_features)[norm].to(DEVICE, dtype)
    fold = folds.norm_fold(module)
    assert fold is not None and fold.centered == (norm == "layer")
    x = (torch.randn(1, 1, in_features, device=DEVICE, generator=g) * 3 + 2).to(dtype)
    linear = torch.nn.Linear(in_features, out_features, device=DEVICE, dtype=dtype)
    torch.nn.init.normal_(linear.weight, std=0.02, generator=g)
    folds.attach_norm(linear, fold)
    rows = (out_features // 3 + 1, out_features - 3) if gelu else (0, 0)
    out = gemv.gemv(x, linear.weight, linear.norm_bias, *rows, linear.norm_scale, linear.norm_row_sums, linear.norm_eps)
    with torch.no_grad():
        ref = F.linear(module.float()(x.float()), linear.weight.float(), linear.bias.float())
    ref[..., rows[0] : rows[1]] = F.gelu(ref[..., rows[0] : rows[1]], approximate="tanh")
    assert out.shape == (1, 1, out_features) and out.dtype == dtype
    assert rel_err(out, ref) < 1e-2
    # without the norm the same kernel gives a different product: the check above sees the norm
    assert rel_err(gemv.gemv(x, linear.weight, linear.bias, *rows), ref) > 0.1


@pytest.mark.parametrize(
    "batch,heads,kv_heads,dim,slots",
    [
        pytest.param(3, 32, 32, 80, 8320, marks=GPU_SIZED),  # Phi-2 at 8k
        (1, 64, 16, 32, 2200),  # grouped queries (4 per KV head), 46 slices of 3 blocks
        (3, 4, 4, 128, 70),  # slices ending inside a block
        (2, 6, 3, 80, 13),  # fewer slots than a block: one slice, the whole-sequence tuning
        (36, 16, 16, 32, 150),  # enough (sequence, head) pairs to fill the card: whole sequences, 2 blocks each
    ],
)
# The interpreter keeps bfloat16 as raw bits and its tl.dot multiplies them (triton#11584, "not supported
# yet"); the kernel's bfloat16 form runs on CUDA, its float16 form everywhere.
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=GPU_SIZED), torch.float16])
def test_split_kv_decode_attention_matches_sdpa(batch, heads, kv_heads, dim, slots, dtype):
    """The graphs engine's Triton decoding attention (split-KV, then the combine) against float32 SDPA,
    with GQA, head dims that are not powers of two, slot counts that are not multiples of the block, and
    masks with holes."""
    from matvlm_cli.kernels.attention import split_kv_decode

    g = generator()
    q = torch.randn(batch, heads, 1, dim, device=DEVICE, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, slots, dim, device=DEVICE, generator=g).to(dtype) for _ in range(2))
    keep = torch.rand(batch, slots, device=DEVICE, generator=g) < 0.7
    keep[:, 0] = True
    out = split_kv_decode(q, k, v, keep, dim**-0.5)
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1), attn_mask=keep[:, None, None, :]
    )
    assert out.shape == (batch, 1, heads, dim) and out.dtype == dtype
    assert rel_err(out, ref.transpose(1, 2)) < 1e-2


@pytest.mark.parametrize(
    "heads,headdim,d_state,groups",
    [pytest.param(32, 80, 80, 32, marks=GPU_SIZED), (8, 64, 128, 2), (6, 12, 10, 3)],
)
def test_fused_decode_step_matches_the_reference_step(heads, headdim, d_state, groups):
    """matvlm's one-kernel Mamba-2 decode step against the PyTorch step in float32: the output, the
    shifted conv window and the updated state, from bf16 activations."""
    from matvlm_cli.kernels.step import mamba2_step

    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=64, nheads=heads, headdim=headdim, d_state=d_state, ngroups=groups)
    mixer = Mamba2Mixer(cfg, 0, device=DEVICE)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.conv1d.bias.normal_()
        mixer.D.normal_()
    projected = torch.randn(3, cfg.in_proj_dim, device=DEVICE).bfloat16()
    conv_state = torch.randn(3, cfg.conv_dim, cfg.d_conv, device=DEVICE).bfloat16()
    state = torch.randn(3, heads, headdim, d_state, device=DEVICE)
    weight = mixer.conv1d.weight.detach().squeeze(1)

    ref_conv, ref_state = conv_state.float(), state.clone()
    z, xBC, dt = projected.float().split([cfg.d_inner, cfg.conv_dim, heads], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias).clamp(*cfg.dt_bounds)
    kernels.set_backend("torch")
    try:
        with torch.no_grad():
            x, B, C = mixer._split_xBC(causal_conv1d_step(xBC, ref_conv, weight, mixer.conv1d.bias))
            y = ssd_step(ref_state, x, dt, -torch.exp(mixer.A_log), B, C, mixer.D)
            reference = mixer.norm(y.reshape(3, cfg.d_inner), z)
    finally:
        kernels.set_backend("auto")
    with torch.no_grad():
        out = mamba2_step(
            projected, conv_state, weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D, state,
            mixer.norm.weight, groups, d_state, *cfg.dt_bounds, mixer.norm.eps,
        )
    assert out.dtype == projected.dtype  # as out_proj reads it: no cast between the step and out_proj
    assert rel_err(out, reference) < 1e-2
    assert rel_err(state, ref_state) < 1e-2
    assert rel_err(conv_state, ref_conv) < 1e-2


@pytest.mark.parametrize("dtype,channels_first", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_prefill_skip_gate_norm_kernel_matches_the_pytorch_norm(dtype, channels_first):
    """The prefill's fused skip + gate + grouped RMSNorm against mamba2.GatedRMSNorm in float32, on views
    with the strides the mixer hands it (x and z are slices of wider rows, y is contiguous; x from a
    channels-first conv output)."""
    from matvlm_cli.hybrid.mamba2 import GatedRMSNorm
    from matvlm_cli.kernels.norm import skip_gate_norm

    g = generator()
    batch, length, heads, headdim, groups = 3, 1000 if DEVICE == "cuda" else 100, 8, 20, 4
    d_inner = heads * headdim
    wide = torch.randn(batch, length + 4, 3 * d_inner, device=DEVICE, generator=g).to(dtype)
    x, z = wide[:, 4:, d_inner : 2 * d_inner], wide[:, 4:, :d_inner]
    if channels_first:
        x = torch.randn(batch, d_inner, length + 4, device=DEVICE, generator=g).to(dtype)[..., 4:].transpose(1, 2)
    y = torch.randn(batch, length, d_inner, device=DEVICE, generator=g).to(dtype)
    D = torch.randn(heads, device=DEVICE, generator=g)
    norm = GatedRMSNorm(d_inner, d_inner // groups, eps=1e-5, device=DEVICE)
    norm.weight.data = torch.rand(d_inner, device=DEVICE, generator=g) + 0.5
    skip = (y.float() + x.float() * D.repeat_interleave(headdim)).to(dtype)
    reference = norm(skip.float(), z.float())
    out = skip_gate_norm(y, x, D, z, norm.weight, d_inner // groups, headdim, 1e-5, dtype)
    assert out.shape == (batch, length, d_inner) and out.dtype == dtype
    assert rel_err(out, reference) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.fixture
def kernel_path(monkeypatch):
    """On a CPU, routes every one-token product to the (interpreted) GEMV kernel, as the engine routes CUDA
    half precision there, on grids for one SM, eight rows a program: the tiny models' grids for 132 SMs take
    the interpreter most of a minute. A batch-1 token's static-cache write goes to its kernel likewise.
    Returns the dtype to build the model in."""
    from matvlm_cli.kernels import cache_write, gemv

    if DEVICE == "cuda":
        return torch.bfloat16
    monkeypatch.setattr(gemv, "takes", lambda x, weight, bias: x.shape[:-1].numel() == 1)
    monkeypatch.setattr(gemv, "sm_count", lambda device: 1)
    monkeypatch.setattr(cache_write, "takes", one_token_write)
    return torch.float32


def test_fused_phi_decodes_one_token_through_the_kernels_like_the_model(tiny_teachers, kernel_path):
    """The graphs engine's projections (bench/fusion.py) on the kernel path, for a tiny Phi teacher and its
    0.5 hybrid: q/k/v/fc1 (or in_proj/fc1) as one GEMV with fc1's GELU inside it, every other projection
    on the GEMV, and the activation modules passing through. One token's logits equal the model's own.
    Without a GPU the kernel runs in the interpreter, in float32, routed there for every one-token product."""
    from matvlm_cli.bench import fusion
    from matvlm_cli.bench.models import build_teacher
    from matvlm_cli.hybrid import convert_to_hybrid

    dtype = kernel_path
    for mamba_layers in ([], [0, 2]):
        model = build_teacher(str(tiny_teachers["phi"]), torch.device(DEVICE), dtype)
        if mamba_layers:
            convert_to_hybrid(model, mamba_layers)
        token = torch.tensor([[7]], device=DEVICE)
        with torch.no_grad():
            before = model(input_ids=token).logits
            fusion.fuse(model)
            after = model(input_ids=token).logits
        activations = [m for m in model.modules() if isinstance(m, fusion.ActivationAfterProjection)]
        assert len(activations) == 4 and all(m.projection[0].gelu_applied for m in activations)
        assert len(_folded_norms(model)) == 4  # each layer's input_layernorm, in the kernel
        assert rel_err(after, before) < (1e-5 if dtype == torch.float32 else 2e-2)
        if DEVICE == "cuda":  # as the graphs engine runs its step: compiled, the flags set and read inside the trace
            with torch.no_grad():
                compiled = torch.compile(lambda ids: model(input_ids=ids).logits)(token)
            assert rel_err(compiled, before) < 2e-2
        # two tokens: F.linear, and the activation modules apply the GELU themselves, as one op. In float32 that
        # is the module's value; in bfloat16 the stand-in rounds once where NewGELUActivation rounds after each of
        # its ops (test_bench checks the stand-in is the nearer to the exact GELU), so the logits differ by
        # bfloat16's rounding (0.8 % for this model on the CPU and on an H100), as the one-token kernel path's do
        two = torch.tensor([[7, 9]], device=DEVICE)
        with torch.no_grad():
            fused_two = model(input_ids=two).logits
            assert not any(m.projection[0].gelu_applied for m in activations)
            fusion.unfuse(model)
            assert rel_err(fused_two, model(input_ids=two).logits) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_one_token_cache_write_leaves_the_static_layer_as_transformers_does(dtype, monkeypatch):
    """bench/static_cache.py's layer against transformers' StaticLayer: a prefill of 5 tokens (the stock
    path), then 3 decoding tokens through `write_token` (3 KV heads of 80: neither a power of 2; the new
    states as strided views, as attention hands them over). Keys, values and the length counter end the
    same, bit for bit; a batch of 2 takes the stock path."""
    from transformers.cache_utils import StaticLayer

    from matvlm_cli.bench.static_cache import OneTokenWriteLayer
    from matvlm_cli.kernels import cache_write

    if DEVICE == "cpu":  # the kernel runs in the interpreter; on CUDA `takes` routes there itself
        monkeypatch.setattr(cache_write, "takes", one_token_write)
    g = generator()
    calls = []
    real_write = cache_write.write_token
    monkeypatch.setattr(cache_write, "write_token", lambda *args: calls.append(1) or real_write(*args))
    stock, fused = StaticLayer(max_cache_len=12), StaticLayer(max_cache_len=12)
    fused.__class__ = OneTokenWriteLayer
    for length in (5, 1, 1, 1):
        # (batch, tokens, heads, dim) transposed to (batch, heads, tokens, dim), as attention layers do
        key = torch.randn(1, length, 3, 80, device=DEVICE, generator=g).to(dtype).transpose(1, 2)
        value = torch.randn(1, length, 3, 80, device=DEVICE, generator=g).to(dtype).transpose(1, 2)
        stock.update(key, value)
        keys, values = fused.update(key, value)
        assert keys is fused.keys and values is fused.values
    assert len(calls) == 3
    assert torch.equal(fused.keys, stock.keys) and torch.equal(fused.values, stock.values)
    assert int(fused.cumulative_length) == int(stock.cumulative_length) == 8
    # a full cache: nothing is written past its last slot (the stock update raises there)
    fused.cumulative_length.fill_(12)
    keys = fused.keys.clone()
    fused.update(torch.ones(1, 3, 1, 80, device=DEVICE, dtype=dtype), torch.ones(1, 3, 1, 80, device=DEVICE, dtype=dtype))
    assert len(calls) == 4 and torch.equal(fused.keys, keys)
    fused.cumulative_length.fill_(8)
    two = StaticLayer(max_cache_len=4)
    two.__class__ = OneTokenWriteLayer
    for length in (2, 1):
        two.update(*(torch.randn(2, 3, length, 80, device=DEVICE, dtype=dtype, generator=g) for _ in range(2)))
    assert len(calls) == 4 and int(two.cumulative_length) == 3


def _half_hybrid_on_the_kernels(tiny_teachers, monkeypatch, family):
    """The tiny `family` teacher converted at ratio 0.5, in float32, with every one-token product and
    cache write routed to the kernels on any device (float32 products too, one SM's grids in the
    interpreter), its batch-1 inputs, and a graphs engine that has not compiled its step.
    Returns (model, layers, inputs, engine)."""
    from matvlm_cli.bench.engines import GraphEngine
    from matvlm_cli.bench.models import bench_inputs, build_teacher, image_input
    from matvlm_cli.hybrid import choose_layers, convert_to_hybrid, find_decoder
    from matvlm_cli.kernels import cache_write, gemv

    monkeypatch.setattr(gemv, "takes", lambda x, weight, bias: x.shape[:-1].numel() == 1 and x.is_contiguous())
    monkeypatch.setattr(cache_write, "takes", one_token_write)
    if DEVICE == "cpu":
        monkeypatch.setattr(gemv, "sm_count", lambda device: 1)
    model = build_teacher(str(tiny_teachers[family]), torch.device(DEVICE), torch.float32)
    layers = len(find_decoder(model).layers)
    convert_to_hybrid(model, choose_layers(layers, ratio=0.5))
    inputs = bench_inputs(model, 100, 1, image_input(model))
    return model, layers, inputs, GraphEngine(model, prefill_chunk=64, compile=False)


@pytest.mark.parametrize("family,traced", [("llama", False), ("phi", True)])
def test_graph_engine_at_batch_1_decodes_through_the_kernels_like_generate(tiny_teachers, monkeypatch, family, traced):
    """The graphs engine at batch 1, where its one-token kernels run: every projection on the GEMV with the
    norms and GELUs folded into it, each token's static-cache write in one kernel, and on CUDA split-KV
    attention. Its greedy tokens equal generate()'s. In float32 on every device, so that a random tiny
    model's near-ties break the same way: the one-token kernels are routed float32 products too (on CUDA
    the engine sends them only half precision), and without a GPU they run in the interpreter. `traced`:
    without a GPU, the step also goes through dynamo (eager backend) in one graph."""
    from matvlm_cli.bench.engines import HFEngine
    from matvlm_cli.hybrid import choose_layers
    from matvlm_cli.kernels import cache_write, gemv

    model, layers, inputs, engine = _half_hybrid_on_the_kernels(tiny_teachers, monkeypatch, family)
    kernels_run = []  # (kernel, folded norm?) per call
    real_gemv, real_write = gemv.gemv, cache_write.write_token
    monkeypatch.setattr(gemv, "gemv", lambda *args: kernels_run.append(("gemv", len(args) > 5 and args[5] is not None)) or real_gemv(*args))
    monkeypatch.setattr(cache_write, "write_token", lambda *args: kernels_run.append(("write", False)) or real_write(*args))
    if traced and DEVICE == "cpu":  # the step as dynamo traces it for the engine, in one graph: the folds' flags
        # and the cache write's mutations must not break it (on a GPU `matvlm bench` compiles the step itself)
        torch._dynamo.reset()  # as the engine does before it compiles: each model's step has its own guards
        engine._next_token = torch.compile(engine._next_token, backend="eager", fullgraph=True, dynamic=True)
    graphs = engine.run(inputs, 8, repeats=1, warmup=0)
    plain = HFEngine(model).run(inputs, 8, repeats=1, warmup=0)
    assert graphs.tokens.shape == (1, 8)
    assert torch.equal(graphs.tokens, plain.tokens)
    # 7 decoding steps, each through the kernels: a write per attention layer, and GEMVs with norms folded.
    # (Greedy tokens are a coarse check: a value written one slot late left them as they were. The cache
    # layer's own test compares the cache bit for bit.)
    attention_layers = layers - len(choose_layers(layers, ratio=0.5))
    writes, folded = kernels_run.count(("write", False)), kernels_run.count(("gemv", True))
    if DEVICE == "cpu":  # every step runs in Python
        assert writes == 7 * attention_layers and folded >= 7 * layers
    else:  # a CUDA graph replays its kernels without Python: only the steps run to capture it are counted
        assert writes > 0 and writes % attention_layers == 0 and folded >= writes // attention_layers * layers


def _folded_norms(model):
    from matvlm_cli.bench import fusion

    return [m for m in model.modules() if isinstance(m, fusion.NormBeforeProjection)]


def _gemv_sums():
    """Small functions of GEMV products and adds, each with the number of adds the residual fold can take:
    (function, inputs, foldable adds)."""
    from matvlm_cli.kernels import gemv

    g = generator()
    x = torch.randn(1, 1, 40, device=DEVICE, generator=g)
    hidden = torch.randn(1, 1, 24, device=DEVICE, generator=g)
    w1, w2 = (torch.randn(24, 40, device=DEVICE, generator=g) * 0.1 for _ in range(2))
    bias = torch.randn(24, device=DEVICE, generator=g)

    def parallel_block(x, hidden, w1, w2, bias):  # Phi: hidden + attention + MLP, both products of one input
        return gemv.gemv(x, w1, bias) + gemv.gemv(x, w2, None, 3, 20) + hidden

    def two_residuals(x, hidden, w1, w2, bias):  # Llama: each sublayer adds to the residual stream, the sum read twice
        hidden = hidden + gemv.gemv(x, w1, None)
        return gemv.gemv(torch.cat([hidden, hidden[..., :16]], -1), w2, bias) + hidden

    def read_twice(x, hidden, w1, w2, bias):  # the product is read by more than the add: left
        product = gemv.gemv(x, w1, bias)
        return product + hidden, product * 2

    def broadcast(x, hidden, w1, w2, bias):  # a term of another shape: left
        return gemv.gemv(x, w1, bias) + hidden[..., :1]

    def promoted(x, hidden, w1, w2, bias):  # a term of another dtype: left
        return gemv.gemv(x, w1, bias) + hidden.double()

    def scaled(x, hidden, w1, w2, bias):  # add with alpha: left
        return torch.add(gemv.gemv(x, w1, bias), hidden, alpha=2.0)

    functions = [(parallel_block, 2), (two_residuals, 2), (read_twice, 0), (broadcast, 0), (promoted, 0), (scaled, 0)]
    return [(function, (x, hidden, w1, w2, bias), adds) for function, adds in functions]


@pytest.mark.parametrize("function,inputs,adds", _gemv_sums(), ids=lambda value: getattr(value, "__name__", ""))
def test_residual_fold_moves_adds_into_the_gemv_and_keeps_the_sum(function, inputs, adds):
    """bench/residual_fold.py on a traced graph: every add of a GEMV's output that nothing else reads and a
    tensor of its shape and dtype becomes the GEMV's residual (a chain for a sum of two products and a
    third tensor), the other adds stay; the rewritten graph computes the same values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from matvlm_cli.bench.residual_fold import ADD, GEMV, fold_residual_adds

    traced = make_fx(function, tracing_mode="fake")(*inputs)
    before = sum(node.target is ADD for node in traced.graph.nodes)
    assert fold_residual_adds(traced.graph) == adds
    traced.recompile()
    assert sum(node.target is ADD for node in traced.graph.nodes) == before - adds
    assert sum("residual" in node.kwargs for node in traced.graph.nodes if node.target is GEMV) == adds
    for got, want in zip(torch.utils._pytree.tree_leaves(traced(*inputs)), torch.utils._pytree.tree_leaves(function(*inputs))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_compiled_step_folds_every_residual_add_and_decodes_like_generate(tiny_teachers, monkeypatch, family):
    """The graphs engine's own compile (inductor, with bench/residual_fold.py as its post-grad pass) of a
    0.5 hybrid's batch-1 step: both residual adds of every layer, attention and Mamba, go into a GEMV (for
    Phi's parallel block as a chain), and the greedy tokens equal generate()'s. In float32, the one-token
    kernels routed as in the batch-1 engine test; without a GPU inductor compiles for the CPU and the
    kernels run in the interpreter."""
    import torch._inductor.config as inductor_config

    from matvlm_cli.bench.engines import HFEngine

    model, layers, inputs, engine = _half_hybrid_on_the_kernels(tiny_teachers, monkeypatch, family)
    engine.compile_step()
    with inductor_config.patch(fx_graph_cache=False):  # so that the pass runs, and counts
        graphs = engine.run(inputs, 4, repeats=1, warmup=0)
    plain = HFEngine(model).run(inputs, 4, repeats=1, warmup=0)
    assert torch.equal(graphs.tokens, plain.tokens)
    assert engine.residual_fold.folded == [2 * layers]  # one graph: the batch-1 step


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_family_decodes_one_token_through_the_kernels_with_its_norms_folded(family, kernel_path):
    """Every zoo family's pre-norms (RMS norms; Gemma's of 1 + weight), folded into the GEMV after them:
    for one token the norm modules do not run (the kernel normalises the raw input) and the logits equal
    the unfused model's; for two tokens the norms run as before."""
    from matvlm_cli.bench import fusion

    model = zoo.build(family).eval().to(DEVICE, kernel_path)
    token, two = torch.tensor([[7]], device=DEVICE), torch.tensor([[7, 9]], device=DEVICE)
    with torch.no_grad():
        before, before_two = model(input_ids=token).logits, model(input_ids=two).logits
        fusion.fuse(model)
        folded = _folded_norms(model)
        calls = []
        for module in folded:
            module.norm.register_forward_hook(lambda *_: calls.append(1))
        after = model(input_ids=token).logits
        assert len(folded) == 2 * 4 and not calls
        assert rel_err(after, before) < (1e-5 if kernel_path == torch.float32 else 2e-2)
        after_two = model(input_ids=two).logits
        assert len(calls) == len(folded) and rel_err(after_two, before_two) < (1e-5 if kernel_path == torch.float32 else 2e-2)
        fusion.unfuse(model)


def test_fused_gemma_decodes_one_token_through_the_kernels_like_the_model(kernel_path):
    """Gemma's gated MLP takes a tanh GELU of its gate projection: in the fused gate/up GEMV the GELU covers
    the gate's rows only, the up rows leave as they are, and one token's logits equal the model's own."""
    from matvlm_cli.bench import fusion

    model = zoo.build("gemma3").eval().to(DEVICE, kernel_path)
    token = torch.tensor([[7]], device=DEVICE)
    with torch.no_grad():
        before = model(input_ids=token).logits
        fusion.fuse(model)
        after = model(input_ids=token).logits
    layers = fusion.find_decoder(model).layers
    for layer in layers:
        gate = layer.mlp.gate_proj
        assert gate.shared is layer.mlp.up_proj.shared and gate.shared.gelu_rows == (0, gate.out_features)
        assert gate.shared.gelu_applied and isinstance(layer.mlp.act_fn, fusion.ActivationAfterProjection)
    assert rel_err(after, before) < (1e-5 if kernel_path == torch.float32 else 2e-2)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs these experiments in full (experiments/gpu/h200_bench.sh)")
@pytest.mark.parametrize("script", ["decode_combine.py", "gemv_prefetch.py"])
def test_the_kernel_experiments_waiting_for_a_gpu_still_run_on_the_kernels_they_share(script):
    """experiments/gpu's kernel variants call the engine kernels' pieces (attention.attend_slice; gemv's
    weight_tile, accumulate and finish), so a change there can break them, found only on the GPU machine,
    whose time is short. Their --cpu mode runs them on small shapes in the interpreter: every variant's
    values equal the engine's (decode_combine: both within 1e-5 of float32 SDPA; gemv_prefetch: equal
    outputs, close ones with the earlier tiles, and the engine's chain within 1e-5 of float64)."""
    folder = Path(__file__).resolve().parents[1] / "experiments" / "gpu"
    result = subprocess.run([sys.executable, str(folder / script), "--cpu"], capture_output=True, text=True, cwd=folder,
                            env=os.environ | {"TRITON_INTERPRET": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    if script == "decode_combine.py":
        errors = [float(e) for e in re.findall(r"err ([0-9.e+-]+)", result.stdout)]
        assert len(errors) == 4 and max(errors) < 1e-5, result.stdout
    else:
        assert result.stdout.count("outputs equal to the engine's") == 5 and "DIFFER" not in result.stdout, result.stdout
        assert result.stdout.count("outputs close to the engine's") == 1, result.stdout
        assert "engine chain against float64" in result.stdout
