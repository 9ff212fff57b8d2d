"""`matvlm bench` on CPU: the engines agree with generate(), the bytes-floor arithmetic, the
comparisons, and the report files (bench.json, bench.png) of a real run on the embedded teacher (in a
process of its own; the other command lines go through the entry point in this process, the `cli` fixture)."""

import json
import subprocess
import sys

import pytest
import torch

from matvlm_cli.bench import floor, fusion
from matvlm_cli.bench.engines import GraphEngine, HFEngine, cache_sizes
from matvlm_cli.bench.models import bench_inputs, build_teacher, image_input, model_specs
from matvlm_cli.bench.report import comparisons, paper_style, throughput_gains
from matvlm_cli.hybrid import choose_layers, convert_to_hybrid

CPU = torch.device("cpu")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "matvlm_cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("family,ratio", [("llama", None), ("llama", 0.5), ("phi", 0.25), ("qwen2", 0.5)])
def test_static_engine_decodes_like_generate(tiny_teachers, family, ratio):
    model = build_teacher(str(tiny_teachers[family]), CPU, torch.float32)
    if ratio:
        convert_to_hybrid(model, choose_layers(4, ratio=ratio))
    inputs = bench_inputs(model, 150, 2, image_input(model))
    # prefill in chunks of 64 tokens: later chunks attend to the cached ones through the registered mask
    static = GraphEngine(model, prefill_chunk=64).run(inputs, 16, repeats=3, warmup=0)
    plain = HFEngine(model).run(inputs, 16, repeats=1, warmup=0)
    assert static.tokens.shape == (2, 16)
    assert torch.equal(static.tokens, plain.tokens)
    assert static.prefill_ms > 0 and static.decode_ms_per_token > 0 and static.peak_bytes is None
    assert len(static.prefill_runs_ms) == 3 and static.prefill_ms == sorted(static.prefill_runs_ms)[1]


def test_cache_bytes_match_the_floor_arithmetic(tiny_teachers):
    model = build_teacher(str(tiny_teachers["llama"]), CPU, torch.float32)
    engine = GraphEngine(model)
    inputs = bench_inputs(model, 100, 3, image_input(model))
    cache, _ = engine.prefill(inputs, max_len=120)
    kv, state = cache_sizes(cache)
    assert kv == floor.kv_bytes(model, 120, batch=3, dtype_bytes=4) and state == 0

    convert_to_hybrid(model, [1, 3])
    cache, _ = engine.prefill(inputs, max_len=120)
    kv_hybrid, state = cache_sizes(cache)
    assert kv_hybrid == floor.kv_bytes(model, 120, batch=3, dtype_bytes=4) == kv // 2
    mixer = model.model.language_model.layers[1].self_attn.config
    # per layer and sequence: conv window (in the activations' dtype) + fp32 SSM state
    per_layer = mixer.conv_dim * mixer.d_conv * 4 + mixer.nheads * mixer.headdim * mixer.d_state * 4
    assert state == 2 * 3 * per_layer


def test_decode_weight_bytes_counts_the_language_model_once(tiny_teachers):
    model = build_teacher(str(tiny_teachers["phi"]), CPU, torch.float32)
    text = model.model.language_model
    embedding = text.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    expected = sum(p.numel() for p in text.parameters()) * 4 - embedding.numel() * 4 + head.numel() * 4
    expected += 2 * embedding.shape[1] * 4  # two rows of the embedding for batch 2
    assert floor.decode_weight_bytes(model, batch=2) == expected
    vision = sum(p.numel() for p in model.model.vision_tower.parameters()) * 4
    assert floor.decode_weight_bytes(model) < sum(p.numel() for p in model.parameters()) * 4 - vision + 1


def test_floor_arithmetic():
    # 5 GB weights + 2 GB KV + 10 MB state read and written, at 2 TB/s
    moved = floor.floor_bytes(5_000_000_000, 2_000_000_000, 10_000_000)
    assert moved == 7_020_000_000
    assert floor.floor_ms(moved, 2e12) == pytest.approx(3.51)
    assert floor.measure_bandwidth(CPU, gib=0.01, repeats=2) > 1e8


def _row(model, engine, decode, floor_ms, peak, kv, seq_len=8192):
    return {"model": model, "engine": engine, "seq_len": seq_len, "batch": 1, "decode_ms": decode, "floor_ms": floor_ms,
            "peak_gib": peak, "kv_cache_bytes": kv, "error": None}


def test_comparisons_pair_rows_of_the_same_engine_only():
    gib = 2**30
    rows = [
        _row("teacher", "graphs", 3.0, 2.5, 12.0, 4 * gib), _row("hybrid-0.5", "graphs", 2.4, 2.0, 10.1, 2 * gib),
        _row("teacher", "hf", 57.0, 2.5, 12.5, 4 * gib), _row("hybrid-0.5", "hf", 50.0, 2.0, 10.5, 2 * gib),
    ]
    fair = {c["engine"]: c for c in comparisons(rows)}
    assert fair["graphs"]["speedup"] == pytest.approx(1.25) and fair["graphs"]["floor_speedup"] == pytest.approx(1.25)
    assert fair["graphs"]["fraction_of_floor_speedup"] == pytest.approx(1.0)
    assert fair["graphs"]["saved_fraction_of_kv"] == pytest.approx(0.95)
    assert fair["hf"]["speedup"] == pytest.approx(57 / 50)
    (paper,) = paper_style(rows)
    assert paper["speedup"] == pytest.approx(57 / 2.4)
    gains = throughput_gains([
        {"model": "teacher", "seq_len": 8192, "max_batch": 20, "tokens_per_s": 800.0},
        {"model": "hybrid-0.5", "seq_len": 8192, "max_batch": 40, "tokens_per_s": 1400.0},
    ])
    assert gains[0]["tokens_per_s_ratio"] == pytest.approx(1.75) and gains[0]["batch_ratio"] == 2


def test_model_specs_build_teacher_then_converted_hybrids(tiny_teachers):
    specs = model_specs(str(tiny_teachers["llama"]), [], [0.25, 0.5], "even", CPU, torch.float32)
    assert [s.label for s in specs] == ["teacher", "hybrid-0.25", "hybrid-0.5"]
    from matvlm_cli.hybrid import hybrid_layers

    assert [hybrid_layers(s.build()) for s in specs] == [[], [0], [0, 2]]


def test_bench_cli_on_the_embedded_teacher(tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench", "--seq-len", 96, "--seq-len", 160, "--gen-len", 6, "--repeats", 1, "--profile", "--output", out)
    assert result.returncode == 0, result.stderr
    assert "CPU" in result.stdout
    for label in ("teacher", "hybrid-0.25", "hybrid-0.5"):  # --profile: one table per model at the first length
        assert (out / f"profile-{label}-96.txt").read_text().startswith(f"{label}: one decode step at 96 tokens")
    report = json.loads((out / "bench.json").read_text())
    assert report["device_type"] == "cpu" and report["bandwidth_gb_s"] > 0
    labels = {(r["model"], r["engine"], r["seq_len"]) for r in report["rows"]}
    assert labels == {(m, e, s) for m in ("teacher", "hybrid-0.25", "hybrid-0.5") for e in ("graphs", "hf") for s in (96, 160)}
    for row in report["rows"]:
        assert row["error"] is None and row["decode_ms"] > 0 and row["x_floor"] > 0
        assert len(row["prefill_runs_ms"]) == 1 and row["prefill_runs_ms"][0] == pytest.approx(row["prefill_ms"], abs=0.01)
    hybrid = {r["model"]: r["kv_cache_bytes"] for r in report["rows"] if r["engine"] == "graphs" and r["seq_len"] == 160}
    assert hybrid["hybrid-0.5"] == hybrid["teacher"] // 2 and hybrid["hybrid-0.25"] == hybrid["teacher"] * 3 // 4
    assert len(report["comparisons"]) == 8 and len(report["paper_style"]) == 4
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratio", "1.5"], "--ratio: 1.5 is outside (0, 1]"),  # the flag, not the recipe key (#23)
        (["--engine", "vllm"], "unknown engine 'vllm'"),
        (["--backend", "cutlass"], "--backend must be one of"),
        (["--student", "/nonexistent/hybrid"], "--student: /nonexistent/hybrid is not a model directory"),
        (["--teacher", "gpt-5"], "teacher 'gpt-5': neither a preset"),
        (["--kernels"], "needs a GPU"),
        (["--backend", "mamba-ssm"], "backend: backend 'mamba-ssm' requested but it does not import here"),
    ],
)
def test_bench_user_errors_are_one_line(args, message, tmp_path, cli):
    result = cli("bench", *args, "--output", tmp_path / "b")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b" / "bench.json").exists()


# The products each decoder layer's projections become, each a list of (module, projection) that read one
# tensor: (in an attention layer, in a Mamba layer) of each family's tiny model.
QKV = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")]
GATE_UP = [("mlp", "gate_proj"), ("mlp", "up_proj")]
SHARED_INPUTS = {
    "llama": ([QKV, GATE_UP], [GATE_UP]),
    # Phi's parallel block: attention and MLP read the same normed input
    "phi": ([QKV + [("mlp", "fc1")]], [[("self_attn", "in_proj"), ("mlp", "fc1")]]),
}


# The norm before each product, by (norm, a projection of the product it folds into), per family as above.
NORMS_BEFORE = {
    "llama": ([("input_layernorm", ("self_attn", "q_proj")), ("post_attention_layernorm", ("mlp", "gate_proj"))],
              [("input_layernorm", ("self_attn", "in_proj")), ("post_attention_layernorm", ("mlp", "gate_proj"))]),
    "phi": ([("input_layernorm", ("mlp", "fc1"))], [("input_layernorm", ("mlp", "fc1"))]),
}


@pytest.mark.parametrize("family", sorted(SHARED_INPUTS))
def test_projections_that_read_one_input_become_one_and_keep_outputs_and_weights(tiny_teachers, family):
    """fuse() finds by a probe forward which projections read the same tensor, in a teacher and in a 0.5
    hybrid (layers 0 and 2 Mamba): q/k/v, gate/up, and in Phi's parallel block q/k/v with fc1 or a Mamba
    in_proj (no bias) with fc1 (bias). The logits do not change, the weights are held once, and unfuse
    restores the modules."""
    model = build_teacher(str(tiny_teachers[family]), CPU, torch.float32)
    convert_to_hybrid(model, [0, 2])
    inputs = bench_inputs(model, 40, 2, image_input(model))
    before = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits
    weight_bytes = floor.decode_weight_bytes(model)
    layers = model.model.language_model.layers

    def products(i):
        return SHARED_INPUTS[family][1 if i in (0, 2) else 0]

    originals = {(i, parent, name): getattr(getattr(layer, parent), name)
                 for i, layer in enumerate(layers) for product in products(i) for parent, name in product}

    assert fusion.fuse(model) == sum(len(products(i)) for i in range(len(layers)))
    for i, layer in enumerate(layers):
        slices = [getattr(getattr(layer, parent), name) for product in products(i) for parent, name in product]
        assert all(isinstance(part, fusion.ProjectionSlice) for part in slices)
        assert len({id(part.shared) for part in slices}) == len(products(i))
        # what reads nothing shared goes to the one-token GEMV: o_proj, down_proj or fc2, a Mamba out_proj
        assert not any(type(m) is torch.nn.Linear for m in layer.modules())
    if family == "phi":
        mamba = layers[0].self_attn
        assert mamba.in_proj.bias is None and layers[0].mlp.fc1.bias is not None  # each slice reads as before
        assert mamba.in_proj.shared is layers[0].mlp.fc1.shared
        # the GELU after fc1 goes to the product's GEMV, for fc1's rows only (applied there on CUDA, where
        # the kernel runs: tests/test_triton_kernels.py; here the activation module still applies it)
        for layer in layers:
            fc1 = layer.mlp.fc1
            assert fc1.shared.gelu_rows == (fc1.start, fc1.start + fc1.out_features) and fc1.start > 0
            assert isinstance(layer.mlp.activation_fn, fusion.ActivationAfterProjection)
    else:  # a gated MLP's SiLU is not a tanh GELU: it stays where it is
        assert all(layer.mlp.gate_proj.shared.gelu_rows == (0, 0) for layer in layers)
    # each layer's pre-norms fold into the product after them (a Llama Mamba layer's in_proj alone); the
    # final norm, before the head, does not
    for i, layer in enumerate(layers):
        for norm_name, (parent, name) in NORMS_BEFORE[family][1 if i in (0, 2) else 0]:
            norm, target = getattr(layer, norm_name), getattr(getattr(layer, parent), name)
            assert isinstance(norm, fusion.NormBeforeProjection)
            assert norm.projection[0] is getattr(target, "shared", target) and norm.projection[0].norm_scale is not None
    folded = [m for m in model.modules() if isinstance(m, fusion.NormBeforeProjection)]
    assert len(folded) == sum(len(NORMS_BEFORE[family][1 if i in (0, 2) else 0]) for i in range(len(layers)))
    assert type(model.lm_head) is torch.nn.Linear  # the head and the vision side are left as they are
    # no weight is copied; a projection without a bias beside ones with one reads zeros in its place
    zero_bias_bytes = sum(
        part.out_features * part.shared.bias.element_size() for part in model.modules()
        if isinstance(part, fusion.ProjectionSlice) and not part.has_bias and part.shared.bias is not None
    )
    assert zero_bias_bytes == (2 * 4 * layers[0].self_attn.in_proj.out_features if family == "phi" else 0)
    assert floor.decode_weight_bytes(model) == weight_bytes + zero_bias_bytes
    fused = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits
    torch.testing.assert_close(fused, before)
    assert fusion.fuse(model) == 0  # already fused

    fusion.unfuse(model)
    for (i, parent, name), module in originals.items():
        assert getattr(getattr(layers[i], parent), name) is module and type(module) is torch.nn.Linear
    assert not any(
        type(m) in (fusion.OneTokenLinear, fusion.ProjectionSlice, fusion.ActivationAfterProjection, fusion.NormBeforeProjection)
        for m in model.modules()
    )
    assert not any("norm_scale" in dict(m.named_buffers()) for m in model.modules())
    # the restored modules read views of the fused weight: no copy was kept
    attention = layers[1].self_attn
    assert attention.k_proj.weight.untyped_storage().data_ptr() == attention.q_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits, before)


# --- presets of real shapes: built, converted and floored on the meta device (no weights allocated) ---

import copy  # noqa: E402
import json as _json  # noqa: E402

from transformers import AutoConfig  # noqa: E402

from matvlm_cli.bench.models import PRESETS, PRESETS_DIR  # noqa: E402
from matvlm_cli.hybrid import hybrid_layers  # noqa: E402
from matvlm_cli.hybrid.conversion import attention_windows  # noqa: E402
from matvlm_cli.hybrid.layouts import model_class_for  # noqa: E402

NEW_PRESETS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-4b", "internvl3-2b", "smolvlm2-2.2b", "gemma-3-4b")
CONTEXT = 8192


def meta_preset(name: str, ratio: float | None = None):
    """A preset built with stock transformers on the meta device, converted at `ratio` (the same
    conversion code, structure only), in bf16 as the GPU bench runs it."""
    config = AutoConfig.from_pretrained(PRESETS_DIR / name)
    with torch.device("meta"):
        model = model_class_for(config).from_config(copy.deepcopy(config), dtype=torch.bfloat16)
    if ratio:
        windows = attention_windows(model.config.get_text_config(decoder=True))
        convert_to_hybrid(model, choose_layers(len(windows), ratio=ratio, windows=windows))
    return model


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_presets_build_convert_and_report_their_floor(name):
    assert name in PRESETS and (PRESETS_DIR / name / "preprocessor_config.json").is_file()
    floors = {}
    for ratio in (None, 0.25, 0.5):
        model = meta_preset(name, ratio)
        assert all(p.is_meta for p in model.parameters())
        text = model.config.get_text_config(decoder=True)
        windows = attention_windows(text)
        expected = choose_layers(len(windows), ratio=ratio, windows=windows) if ratio else []
        assert hybrid_layers(model) == expected
        floors[ratio] = floor.decode_floor(model, CONTEXT)
    assert floors[None]["state_bytes"] == 0
    assert floors[0.5]["kv_bytes"] < floors[0.25]["kv_bytes"] < floors[None]["kv_bytes"]
    assert 0 < floors[0.25]["state_bytes"] < floors[0.5]["state_bytes"]
    print(name, {r: {k: round(v / 2**20, 1) for k, v in f.items()} for r, f in floors.items()})  # MiB, for docs/bench.md


def _hand_floor(name: str, ratio_layers: list[int]):
    """Decode-step bytes at CONTEXT tokens, batch 1, bf16, from the preset's config.json by hand:
    the language model's weights (head read in full, one embedding row), KV of the attention layers
    (a sliding layer at most its window), and MaTVLM mixers' state (x from V and B from K, both
    repeated to every query head; C from Q; d_state = head_dim; fp32 SSM state)."""
    raw = _json.loads((PRESETS_DIR / name / "config.json").read_text())
    text = raw.get("text_config", raw)
    defaults = {"gemma-3-4b": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208)}.get(name, {})
    c = {**defaults, **text}
    hidden, layers, heads, kv = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    inter, vocab = c["intermediate_size"], c["vocab_size"]
    qk_norms = name == "gemma-3-4b"
    bias = name.startswith("qwen2.5")  # q/k/v biases
    attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
    attn += (heads * head_dim + 2 * kv * head_dim) if bias else 0
    attn += 2 * head_dim if qk_norms else 0
    norms = (4 if qk_norms else 2) * hidden  # Gemma 3 has pre/post norms around both sublayers
    layer = attn + 3 * hidden * inter + norms
    d_inner, bc = heads * head_dim, heads * head_dim  # ngroups = heads, d_state = head_dim
    conv_dim = d_inner + 2 * bc
    mixer = hidden * (2 * d_inner + 2 * bc + heads) + d_inner * hidden + conv_dim * 4 + conv_dim + 3 * heads + d_inner
    mixer += 2 * bc if qk_norms else 0
    params = layers * layer + hidden + vocab * hidden + hidden + len(ratio_layers) * (mixer - attn)
    kv_window = c.get("sliding_window") if qk_norms else None
    pattern = 6  # Gemma 3: every 6th layer global
    slots = 0
    for i in range(layers):
        if i in ratio_layers:
            continue
        sliding = kv_window and (i + 1) % pattern != 0
        slots += min(CONTEXT, kv_window) if sliding else CONTEXT
    state = len(ratio_layers) * (conv_dim * 4 * 2 + heads * head_dim * head_dim * 4)
    return {"weight_bytes": 2 * params, "kv_bytes": 2 * kv * head_dim * 2 * slots, "state_bytes": state}


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "gemma-3-4b"])
def test_preset_floors_match_a_hand_computation(name):
    for ratio in (None, 0.25, 0.5):
        model = meta_preset(name, ratio)
        got = floor.decode_floor(model, CONTEXT)
        want = _hand_floor(name, hybrid_layers(model))
        assert {k: got[k] for k in want} == want, (ratio, got, want)
    if name == "gemma-3-4b":  # 5 global layers of 34; at 0.25 (8 layers) all 5 are converted first
        assert {5, 11, 17, 23, 29} <= set(hybrid_layers(meta_preset(name, 0.25)))


# --- end to end on tiny random models of other families (tests/zoo.py), through the CLI ---

from tests import zoo  # noqa: E402


def _image_processor(family: str, config):
    """Each family's real image processor class, sized for a tiny tower (a 640x480 image becomes a few
    dozen image tokens)."""
    import transformers as T

    vision = config.vision_config
    if family == "qwen2_vl":
        merged = (vision.patch_size * vision.spatial_merge_size) ** 2
        return T.Qwen2VLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                       temporal_patch_size=vision.temporal_patch_size,
                                       size={"shortest_edge": 4 * merged, "longest_edge": 24 * merged})
    if family == "idefics3":
        return T.Idefics3ImageProcessor(size={"longest_edge": 2 * vision.image_size}, max_image_size={"longest_edge": vision.image_size})
    if family == "gemma3":
        return T.Gemma3ImageProcessor(size={"height": vision.image_size, "width": vision.image_size})
    if family == "llava_next":
        side = vision.image_size
        return T.LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                         image_grid_pinpoints=config.image_grid_pinpoints)
    raise ValueError(family)


@pytest.mark.parametrize("family,tokens", [("qwen2_vl", 20), ("idefics3", 20), ("gemma3", 4), ("llava_next", 44)])
def test_bench_cli_on_other_families(tmp_path, family, tokens, cli):
    model = zoo.build(family)
    directory = tmp_path / family
    model.save_pretrained(directory)
    _image_processor(family, model.config).save_pretrained(directory)
    image = image_input(model, directory)
    assert image.tokens == tokens  # what the model's own get_image_features gives for the processed image
    out = tmp_path / "bench"
    result = cli("bench", "--teacher", directory, "--seq-len", 80, "--gen-len", 4, "--repeats", 1, "--output", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["model"], r["engine"]): r for r in report["rows"]}
    assert set(rows) == {(m, e) for m in ("teacher", "hybrid-0.25", "hybrid-0.5") for e in ("graphs", "hf")}
    for row in rows.values():
        assert row["error"] is None and row["decode_ms"] > 0 and row["x_floor"] > 0
    assert rows["hybrid-0.5", "graphs"]["kv_cache_bytes"] < rows["teacher", "graphs"]["kv_cache_bytes"]
    assert rows["hybrid-0.5", "graphs"]["state_bytes"] > 0


def test_gemv_tiles_are_the_h200_sweeps_best_for_phi2():
    """kernels/gemv.py's tile rule gives, on an H200's 132 SMs, the tiles measured best (or within 0.3 us of
    it) for Phi-2's projections (docs/results/bench/gemv-probe-h200-stages.txt): unpipelined where 4 or 8 rows
    leave 8 programs an SM, else 4 rows pipelined 4 stages deep, down to the smallest product."""
    from matvlm_cli.kernels.gemv import tiles

    assert tiles(7680, 2560, 132) == (4, 256, 4, 1)  # q/k/v
    assert tiles(17920, 2560, 132) == (8, 256, 4, 1)  # q/k/v and fc1 as one product
    assert tiles(2560, 2560, 132) == (4, 512, 4, 4)  # dense: few outputs, so a pipelined loop
    assert tiles(10240, 2560, 132) == (8, 256, 4, 1)  # fc1
    assert tiles(2560, 10240, 132) == (4, 512, 4, 4)  # fc2
    assert tiles(10, 20, 132) == (4, 512, 4, 4)


def test_norms_are_recognised_by_what_they_compute():
    """bench/folds.py folds a module into the GEMV after it only when it computes a layer or RMS norm with its
    weight (or Gemma's 1 + weight) as the scale: a group norm, a gated norm and a norm without a weight are
    left alone, whatever their attributes."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from matvlm_cli.bench import folds
    from matvlm_cli.hybrid.mamba2 import GatedRMSNorm

    layer = torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    fold = folds.norm_fold(layer)
    assert fold.centered and fold.eps == 1e-5 and torch.equal(fold.shift, layer.bias.detach())
    rms = folds.norm_fold(LlamaRMSNorm(32, eps=1e-6))
    assert not rms.centered and rms.shift is None and rms.eps == 1e-6
    gemma = Gemma3RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        gemma.weight.uniform_(-0.5, 0.5)
    torch.testing.assert_close(folds.norm_fold(gemma).scale, 1 + gemma.weight.detach())
    for other in (torch.nn.GroupNorm(4, 32), GatedRMSNorm(32, 8), torch.nn.LayerNorm(32, elementwise_affine=False)):
        assert folds.norm_fold(other) is None


def test_a_tanh_gelu_left_to_its_module_runs_as_one_kernel_with_the_same_values():
    """Where the GEMV does not apply it (a prefill chunk, a batch, a CPU), the stand-in for a tanh GELU computes
    what each of transformers' tanh GELUs computes, as one op: under the profiler a (tokens, width) input costs
    one aten call, where NewGELUActivation (Phi's) costs several."""
    import torch.nn.functional as F
    import transformers.activations as hf_activations
    from torch.profiler import ProfilerActivity, profile

    from matvlm_cli.bench import folds

    projection = torch.nn.Module()
    projection.gelu_applied = False
    # float64: the formulas compared, not float32's rounding; and torch 2.13's float32 tanh on this CPU is
    # sometimes off by 1e-4 near ±1 in a process's first parallel call (6 runs in 30 of the same three ops)
    x = torch.randn(64, 256, dtype=torch.float64) * 3
    assert len(folds.TANH_GELUS) >= 2  # NewGELUActivation and at least one other name this version has

    def aten_ops(module) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(x)
        return sum(1 for event in prof.events() if event.name.startswith("aten::") and "empty" not in event.name)

    for activation in [cls() for cls in folds.TANH_GELUS] + [torch.nn.GELU(approximate="tanh")]:
        stand_in = folds.ActivationAfterProjection(activation, projection)
        torch.testing.assert_close(stand_in(x), activation(x), rtol=1e-9, atol=1e-12)
        assert aten_ops(stand_in) == 1
    assert aten_ops(hf_activations.NewGELUActivation()) >= 6
    # in bfloat16 the one op computes in float32 and rounds once: within one bfloat16 step of the exact GELU,
    # where NewGELUActivation's eight ops, each rounded, are further off (some small values lose every digit)
    exact = F.gelu(x.bfloat16().double(), approximate="tanh")
    visible = exact.abs() > 1e-3

    def error(activation) -> tuple[float, float]:
        off = (activation(x.bfloat16()).double() - exact).abs()
        return (off[visible] / exact[visible].abs()).max().item(), off.mean().item()

    (stand_in_rel, stand_in_mean), (new_gelu_rel, new_gelu_mean) = error(stand_in), error(hf_activations.NewGELUActivation())
    assert stand_in_rel <= 2**-8 < new_gelu_rel and stand_in_mean < new_gelu_mean
    projection.gelu_applied = True  # the GEMV applied it: the input passes through
    assert stand_in(x) is x
    with pytest.raises(AssertionError):
        folds.ActivationAfterProjection(torch.nn.SiLU(), projection)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_family_fuses_q_k_v_and_gate_up_by_what_they_read(family):
    """The probe forward finds, in each family's decoder (M-RoPE, q/k norms, sliding windows, Gemma's
    scaled embeddings), q/k/v and gate/up as the projections that read one input, per layer; the logits
    do not change."""
    model = zoo.build(family).eval()
    ids = torch.randint(4, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fusion.fuse(model) == 2 * 4
        layer = fusion.find_decoder(model).layers[0]
        assert layer.self_attn.q_proj.shared is layer.self_attn.v_proj.shared
        assert layer.mlp.gate_proj.shared is layer.mlp.up_proj.shared is not layer.self_attn.q_proj.shared
        # the pre-norms before both products fold into them, found by what they compute (Gemma's 1 + weight too)
        folded = [m.projection[0] for m in model.modules() if isinstance(m, fusion.NormBeforeProjection)]
        assert len(folded) == 2 * 4 and layer.self_attn.q_proj.shared in folded and layer.mlp.gate_proj.shared in folded
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_terminal_tables_fit_80_columns_with_every_number_whole():
    """The bench's tables in an 80-column terminal, on a real report (session 18's H200 run), with a student
    directory's long name and a row that failed: nothing is cut (no "…"), the long name folds onto the
    lines below its row, every number a row shows is whole on its line, and the failure is a line of its own."""
    import io
    from pathlib import Path

    from rich.console import Console

    from matvlm_cli.bench import report

    data = json.loads((Path(__file__).resolve().parents[1] / "docs/results/bench/bench-h200-fc2.json").read_text())
    long_name = "tiny-default-0.25-distilled-final"
    data["rows"][1]["model"] = data["comparisons"][0]["model"] = long_name
    data["rows"][2]["error"] = "does not fit (batch 1 needs more than the card's memory)"
    console = Console(width=80, record=True, file=io.StringIO())
    report.print_report(data, console)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80 and not any("…" in line for line in lines)
    rows = [i for i, line in enumerate(lines) if " graphs " in line]  # one line per table row, then its folds
    shown = [row for row in data["rows"] if not row["error"]]
    assert len(rows) == len(shown) + len(data["comparisons"])
    for i, row in zip(rows, shown):
        assert lines[i].split()[-6:] == [str(row["seq_len"]), str(row["batch"]), f"{row['prefill_ms']:.1f}",
                                         f"{row['decode_ms']:.2f}", f"{row['x_floor']:.2f}", f"{row['peak_gib']:.2f}"]
    for i, comparison in zip(rows[len(shown):], data["comparisons"]):
        assert lines[i].split()[4:6] == [f"{comparison['speedup']:.2f}x", f"{comparison['floor_speedup']:.2f}x"]
    for i in (rows[1], rows[len(shown)]):  # the long name, in the rows table and in the comparison
        assert "".join(line.strip() for line in [lines[i].split()[0], *lines[i + 1: i + 4]]).startswith(long_name)
    failed = data["rows"][2]
    assert f"{failed['model']} ({failed['engine']}) at {failed['seq_len']} tokens, batch 1: does not fit" in " ".join(lines)


def test_the_compiled_steps_cache_key_covers_every_file_that_defines_a_custom_op():
    """torch keys a cached compiled graph by its FX code and takes any custom op in it as cacheable without
    hashing the op's fake implementation. The compiled step's key (`ResidualFold.uuid`, its post-grad pass)
    therefore hashes every file of matvlm that defines one, so a changed op is compiled again, not loaded."""
    from pathlib import Path

    import matvlm_cli
    from matvlm_cli.bench import residual_fold

    sources = Path(matvlm_cli.__file__).parent.rglob("*.py")
    defining = {str(path) for path in sources if "torch.library.custom_op(" in path.read_text()}
    assert {Path(path).name for path in defining} >= {"gemv.py", "step.py", "cache_write.py"}
    assert defining <= set(residual_fold.cache_key_files())
    assert residual_fold.ResidualFold().uuid() == residual_fold.get_hash_for_files(residual_fold.cache_key_files())
