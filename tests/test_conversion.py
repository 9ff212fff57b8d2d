"""Layer choice, initialisation from attention, and that nothing else changes."""

import pytest
import torch
from conftest import FAMILIES
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from matvlm_cli.errors import MatvlmError
from matvlm_cli.hybrid import Mamba2Mixer, choose_layers, convert_to_hybrid, find_decoder, hybrid_layers, load_teacher


def test_even_placement_reproduces_matvlm_released_layers():
    assert choose_layers(32, 0.25, "even") == list(range(0, 32, 4))
    assert choose_layers(32, 0.5, "even") == list(range(0, 32, 2))
    assert choose_layers(32, 0.125, "even") == list(range(0, 32, 8))


def test_other_placements():
    assert choose_layers(8, 0.25, "front") == [0, 1]
    assert choose_layers(8, 0.25, "back") == [6, 7]
    assert choose_layers(8, 0.25, "middle") == [3, 4]
    assert choose_layers(8, 1.0, "even") == list(range(8))
    assert choose_layers(8, layers=[5, 1]) == [1, 5]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ratio": 0.0}, "outside (0, 1]"),
        ({"ratio": 1.2}, "outside (0, 1]"),
        ({"ratio": 0.01}, "rounds to 0"),
        ({"ratio": 0.5, "placement": "random"}, "placement"),
        ({"layers": [1, 1]}, "duplicate"),
        ({"layers": [8]}, "out of range"),
        ({"layers": [-1]}, "out of range"),
        ({"layers": []}, "empty"),
    ],
)
def test_bad_layer_choices_are_user_errors(kwargs, message):
    with pytest.raises(MatvlmError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        choose_layers(8, **kwargs)


def test_decoder_is_the_language_model_not_the_vision_tower(tiny_teachers):
    model = load_teacher(tiny_teachers["llama"])
    layout = find_decoder(model)
    assert layout.layers is model.model.language_model.layers


def repeat_heads(weight, kv_heads, head_dim, repeat):
    return weight.unflatten(0, (kv_heads, head_dim)).repeat_interleave(repeat, 0).flatten(0, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixer_is_initialised_from_attention(tiny_teachers, family):
    teacher = load_teacher(tiny_teachers[family])
    layers = [1, 3]
    attention = {i: find_decoder(teacher).attention(i) for i in layers}
    snapshot = {i: {n: p.clone() for n, p in attention[i].named_parameters()} for i in layers}
    out_name = "dense" if family == "phi" else "o_proj"
    config = convert_to_hybrid(teacher, layers)
    heads, head_dim = config.nheads, config.headdim
    kv_heads = snapshot[1]["k_proj.weight"].shape[0] // head_dim
    assert config.d_state == head_dim and config.ngroups == heads
    d, bc = config.d_inner, config.ngroups * config.d_state
    for i in layers:
        mixer = find_decoder(teacher).attention(i)
        assert isinstance(mixer, Mamba2Mixer) and mixer.layer_idx == i
        w, ref = mixer.in_proj.weight, snapshot[i]
        rep = heads // kv_heads
        assert torch.equal(w[d : 2 * d], repeat_heads(ref["v_proj.weight"], kv_heads, head_dim, rep))
        assert torch.equal(w[2 * d : 2 * d + bc], repeat_heads(ref["k_proj.weight"], kv_heads, head_dim, rep))
        assert torch.equal(w[2 * d + bc : 2 * d + 2 * bc], ref["q_proj.weight"])
        assert torch.equal(mixer.out_proj.weight, ref[f"{out_name}.weight"])
        assert mixer.in_proj.bias is None and mixer.out_proj.bias is None  # MaTVLM drops biases
    assert hybrid_layers(teacher) == layers


def test_keep_bias_carries_qwen2_biases(tiny_teachers):
    teacher = load_teacher(tiny_teachers["qwen2"])
    attn = find_decoder(teacher).attention(0)
    q_bias, k_bias, v_bias = attn.q_proj.bias.clone(), attn.k_proj.bias.clone(), attn.v_proj.bias.clone()
    config = convert_to_hybrid(teacher, [0], keep_bias=True)
    mixer = find_decoder(teacher).attention(0)
    d, bc, hd = config.d_inner, config.ngroups * config.d_state, config.headdim
    rep = config.nheads // (k_bias.numel() // hd)
    bias = mixer.in_proj.bias
    assert torch.equal(bias[d : 2 * d], repeat_heads(v_bias, k_bias.numel() // hd, hd, rep))
    assert torch.equal(bias[2 * d : 2 * d + bc], repeat_heads(k_bias, k_bias.numel() // hd, hd, rep))
    assert torch.equal(bias[2 * d + bc : 2 * d + 2 * bc], q_bias)
    assert torch.count_nonzero(bias[:d]) == 0 and torch.count_nonzero(bias[2 * d + 2 * bc :]) == 0
    assert torch.count_nonzero(mixer.out_proj.bias) == 0  # Qwen2's o_proj has no bias


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_but_the_replaced_attention_is_bit_identical(tiny_teachers, family):
    teacher = load_teacher(tiny_teachers[family])
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    layers = [0, 2]
    convert_to_hybrid(teacher, layers)
    hybrid = teacher.state_dict()
    replaced = tuple(f"language_model.layers.{i}.self_attn." for i in layers)
    kept = [k for k in reference if not any(r in k for r in replaced)]
    assert len(kept) > 0.7 * len(reference)
    for key in kept:
        assert torch.equal(hybrid[key], reference[key]), key
    assert not any(k for k in hybrid if any(r in k for r in replaced) and "proj" in k and ("q_proj" in k or "k_proj" in k))


def test_conversion_is_reproducible_from_the_seed(tiny_teachers):
    def mixer_weights(seed):
        model = load_teacher(tiny_teachers["llama"])
        convert_to_hybrid(model, [1], seed=seed)
        return {k: v for k, v in model.state_dict().items() if "layers.1.self_attn" in k}

    first, again, other = mixer_weights(0), mixer_weights(0), mixer_weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.language_model.layers.1.self_attn.in_proj.weight"],
                           other["model.language_model.layers.1.self_attn.in_proj.weight"])


def test_text_only_causal_lm_converts():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=1)).eval()
    convert_to_hybrid(model, choose_layers(4, 0.5))
    assert hybrid_layers(model) == [0, 2]
    out = model.generate(torch.tensor([[1, 5, 7, 9]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_unsupported_architecture_names_the_supported_layouts():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(MatvlmError, match="unsupported architecture GPT2LMHeadModel.*q_proj"):
        convert_to_hybrid(model, [0])


def test_convert_names_what_it_does_not_carry(tiny_teachers, tmp_path):
    from rich.console import Console
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from matvlm_cli.convert import run_convert
    from matvlm_cli.recipes import ConvertRecipe

    olmo2 = tmp_path / "olmo2"  # q/k norms over all heads at once: no per-head mapping
    Olmo2ForCausalLM(Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(olmo2)
    console = Console(record=True, width=300)
    run_convert(ConvertRecipe(teacher=str(olmo2), output=str(tmp_path / "h3"), layers=[1]), console)
    text = console.export_text()
    assert "not carried: q_norm.weight, k_norm.weight (learned parts" in text
    assert "not carried: q_norm/k_norm over the whole projection" in text
    console = Console(record=True, width=300)
    run_convert(ConvertRecipe(teacher=str(tiny_teachers["qwen2"]), output=str(tmp_path / "h2"), layers=[1]), console)
    text = console.export_text()
    assert "not carried: q_proj.bias, k_proj.bias, v_proj.bias (MaTVLM drops" in text and "learned parts" not in text
    console = Console(record=True, width=300)
    run_convert(ConvertRecipe(teacher=str(tiny_teachers["qwen2"]), output=str(tmp_path / "h2b"), layers=[1], keep_bias=True), console)
    assert "not carried" not in console.export_text()
