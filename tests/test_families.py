"""The VLM families people use now (tests/zoo.py: tiny random models from transformers' config classes):
each converts inside its text decoder only, carries or names every part of its attention, keeps left
padding out of the Mamba state, decodes with the cache as recomputation does, and saves and loads
identically."""

import warnings

import pytest
import torch
import zoo
from rich.console import Console

from matvlm_cli.convert import run_convert
from matvlm_cli.errors import MatvlmError
from matvlm_cli.families import MODEL_FAMILIES, TEXT_FAMILIES
from matvlm_cli.hybrid import Mamba2Mixer, convert_to_hybrid, find_decoder, load_hybrid, save_hybrid
from matvlm_cli.hybrid.conversion import attention_windows, choose_layers
from matvlm_cli.recipes import ConvertRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _hybrid(family, layers=(0, 2)):
    model = zoo.build(family)
    convert_to_hybrid(model, list(layers))
    return model


def _extra(family, ids):
    # PaliGemma's processor always gives token types (0 = prefix); without them its own teacher is not padding-safe
    return {"token_type_ids": torch.zeros_like(ids)} if family == "paligemma" else {}


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_family_is_described(family):
    config = zoo.config(family)
    assert config.get_text_config(decoder=True).model_type in TEXT_FAMILIES
    if hasattr(config, "vision_config"):
        assert config.model_type in MODEL_FAMILIES


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_only_the_text_decoder_is_converted(family):
    teacher, model = zoo.build(family), _hybrid(family)
    text_model = model.get_decoder()
    mixers = [name for name, module in model.named_modules() if isinstance(module, Mamba2Mixer)]
    text_prefix = next(name for name, module in model.named_modules() if module is text_model)
    assert len(mixers) == 2 and all(name.startswith(text_prefix + ".layers.") for name in mixers)
    before = teacher.state_dict()
    for name, tensor in model.state_dict().items():  # the vision tower, projector, MLPs, norms: untouched
        if ".layers.0.self_attn." not in name and ".layers.2.self_attn." not in name:
            assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_left_padding_never_reaches_the_mamba_state(family):
    model = _hybrid(family)
    ids = torch.randint(4, 240, (1, 12), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.full((1, 3), 1), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids, **_extra(family, ids)).logits[0]
        batched = model(input_ids=padded, attention_mask=mask, **_extra(family, padded)).logits[0, 3:]
    assert (alone - batched).abs().max() < 1e-4


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_cached_decoding_matches_recomputation(family):
    model = _hybrid(family)
    ids = torch.randint(4, 240, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row in the batch
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=1, **_extra(family, ids))
        full = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)
        extra = _extra(family, full)
        if extra:  # PaliGemma: the prompt is the prefix, what was generated the causal suffix
            extra["token_type_ids"][:, ids.shape[1]:] = 1
        logits = model(input_ids=full, attention_mask=full_mask, **extra).logits
    for step, scores in enumerate(out.scores):
        assert (scores - logits[:, ids.shape[1] - 1 + step]).abs().max() < 1e-3


@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3", "mistral3"])
def test_hybrid_saves_and_loads_identically(family, tmp_path):
    model = _hybrid(family)
    save_hybrid(model, tmp_path / "h")
    loaded = load_hybrid(tmp_path / "h")
    ids = torch.randint(4, 240, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_vl", "gemma3"])
def test_qk_norms_become_b_and_c_norms_with_the_same_gains(family):
    teacher, model = zoo.build(family), _hybrid(family)
    attention, mixer = find_decoder(teacher).attention(2), find_decoder(model).attention(2)
    offset = 1.0 if family == "gemma3" else 0.0  # Gemma scales by (1 + weight)
    heads = mixer.config.ngroups
    assert torch.allclose(mixer.C_norm.weight, (attention.q_norm.weight + offset).repeat(heads))
    assert torch.allclose(mixer.B_norm.weight, (attention.k_norm.weight + offset).repeat(heads))
    eps = getattr(attention.q_norm, "eps", None) or attention.q_norm.variance_epsilon
    assert mixer.config.bc_norm_eps == eps
    assert not (mixer.C_norm.weight == 1).all()  # the zoo's gains are not 1, so this mapping is tested


def test_dropping_qk_norms_leaves_no_b_and_c_norms():
    model = zoo.build("qwen3")
    convert_to_hybrid(model, [0], qk_norms=False)
    mixer = find_decoder(model).attention(0)
    assert mixer.config.bc_norm_eps is None and not hasattr(mixer, "C_norm")


def _report(tmp_path, family, **recipe):
    zoo.build(family).save_pretrained(tmp_path / family)
    console = Console(record=True, width=400)
    run_convert(ConvertRecipe(teacher=str(tmp_path / family), output=str(tmp_path / f"{family}-h"), **recipe), console)
    return console.export_text()


@pytest.mark.parametrize("family, line", [
    ("gemma3", "not carried: Gemma 3's bidirectional attention among an image's tokens"),
    ("paligemma", "not carried: PaliGemma's prefix-LM mask"),
    ("gemma2", "not carried: attention-logit soft-capping (attn_logit_softcapping 50)"),
    ("qwen2_vl", "not carried: q_proj.bias, k_proj.bias, v_proj.bias (MaTVLM drops"),
])
def test_convert_names_what_each_family_loses(tmp_path, family, line):
    assert line in _report(tmp_path, family, ratio=0.5)


def test_carried_qk_norms_are_not_reported_as_dropped(tmp_path):
    text = _report(tmp_path, "qwen3_vl", ratio=0.5)
    assert "q_norm" not in text and "not carried" not in text


def test_sliding_window_teachers_convert_global_layers_first_and_count_windows(tmp_path):
    text_config = zoo.config("gemma3").get_text_config(decoder=True)
    windows = attention_windows(text_config)
    assert windows == [16, 16, 16, None]
    assert choose_layers(4, 0.25, "even", windows=windows) == [3]
    assert choose_layers(4, 0.5, "even", windows=windows) == [0, 3]
    assert choose_layers(4, 0.5, "front", windows=windows) == [0, 1]  # an explicit placement is kept
    text = _report(tmp_path, "gemma3", ratio=0.25)
    # head_dim 16, 2 KV heads, fp32: 256 bytes per token per layer; 3 window layers hold 16 tokens at most
    assert "KV cache bytes / sequence at 512 tokens" in text
    row = next(line for line in text.splitlines() if "/ sequence at 512" in line)
    assert f"{(512 + 3 * 16) * 256:,}" in row and f"{3 * 16 * 256:,}" in row
    assert "1 of the 1 converted layers are global layers" in text


def test_a_vlm_whose_decoder_cannot_be_found_is_refused():
    model = zoo.build("idefics3")
    model.get_decoder = None  # the family description's path still finds it
    assert find_decoder(model).text_model is model.model.text_model
    model.config.model_type = "someones_vlm"  # undescribed, and no get_decoder(): refused, not guessed
    with pytest.raises(MatvlmError, match="cannot tell its text decoder from its vision tower"):
        find_decoder(model)


def test_an_undescribed_vlm_with_get_decoder_converts_with_a_warning():
    model = zoo.build("llava_next")
    model.config.model_type = "someones_vlm"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout = find_decoder(model)
    assert layout.text_model is model.get_decoder()
    assert any("no family description" in str(w.message) for w in caught)


def test_an_undescribed_text_family_converts_with_a_one_line_warning(tmp_path):
    import subprocess
    import sys

    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    Starcoder2ForCausalLM(Starcoder2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "sc2")
    result = subprocess.run(
        [sys.executable, "-m", "matvlm_cli", "convert", "--teacher", str(tmp_path / "sc2"), "--layers", "1",
         "--output", str(tmp_path / "h")], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "warning: no family description for text model 'starcoder2'" in result.stderr
    assert "Traceback" not in result.stderr and "UserWarning" not in result.stderr
    assert (tmp_path / "h" / "model.safetensors").is_file()
