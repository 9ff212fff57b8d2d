"""Tiny random models of the VLM families people use now, built from transformers' own config classes
(nothing downloaded): one per family, with the text decoder's shape shared, 4 layers, GQA, and each
family's own attention features switched on (biases, q/k norms, sliding windows, explicit head_dim)."""

from __future__ import annotations

import torch
import transformers as T

VOCAB, IMAGE_TOKEN_ID = 256, 250
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    tie_word_embeddings=False,
)
SPECIAL = dict(image_token_id=IMAGE_TOKEN_ID)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
QWEN_VISION = dict(depth=2, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]


def _vision(cls, **extra) -> dict:
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **extra).to_dict()


def _siglip(**extra) -> dict:
    return _vision(T.SiglipVisionConfig, image_size=32, patch_size=8, **extra)


def config(family: str):
    """The tiny config of one family (a key of `FAMILIES`)."""
    videos = dict(SPECIAL, video_token_id=251, vision_start_token_id=252)
    if family == "qwen2_vl":
        return T.Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=MROPE), vision_config=dict(QWEN_VISION, embed_dim=32, hidden_size=64), **videos)
    if family == "qwen2_5_vl":
        return T.Qwen2_5_VLConfig(
            text_config=dict(TEXT, rope_parameters=MROPE),
            vision_config=dict(QWEN_VISION, hidden_size=32, intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[1], window_size=16),
            **videos,
        )
    if family == "qwen3_vl":
        return T.Qwen3VLConfig(
            text_config=dict(TEXT, head_dim=16, rope_parameters=dict(MROPE, mrope_interleaved=True)),
            vision_config=dict(QWEN_VISION, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0]),
            **videos,
        )
    if family == "idefics3":
        return T.Idefics3Config(text_config=dict(TEXT), vision_config=_vision(T.Idefics3VisionConfig, image_size=32, patch_size=8), scale_factor=2, **SPECIAL)
    if family == "smolvlm":
        return T.SmolVLMConfig(text_config=dict(TEXT), vision_config=_vision(T.SmolVLMVisionConfig, image_size=32, patch_size=8), scale_factor=2, **SPECIAL)
    if family == "internvl":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8])
        return T.InternVLConfig(text_config=dict(TEXT, model_type="qwen2"), vision_config=vision, downsample_ratio=0.5, **SPECIAL)
    if family == "gemma3":
        text = dict(TEXT, head_dim=16, sliding_window=16, layer_types=GEMMA3_LAYERS)
        return T.Gemma3Config(text_config=text, vision_config=_siglip(), mm_tokens_per_image=4, boi_token_index=251, eoi_token_index=252, **SPECIAL)
    if family == "mistral3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)
        return T.Mistral3Config(text_config=dict(TEXT, model_type="mistral", head_dim=24, sliding_window=None), vision_config=vision, spatial_merge_size=2, **SPECIAL)
    if family == "paligemma":
        return T.PaliGemmaConfig(text_config=dict(TEXT, model_type="gemma", head_dim=16), vision_config=_siglip(projection_dim=64), projection_dim=64, **SPECIAL)
    if family == "llava_next":
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        return T.LlavaNextConfig(text_config=dict(TEXT, model_type="llama"), vision_config=_vision(T.CLIPVisionConfig, image_size=32, patch_size=8), image_grid_pinpoints=pinpoints, **SPECIAL)
    if family == "llava_onevision":
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        return T.LlavaOnevisionConfig(text_config=dict(TEXT, model_type="qwen2"), vision_config=_siglip(), image_grid_pinpoints=pinpoints, video_token_id=251, **SPECIAL)
    if family == "qwen3":
        return T.Qwen3Config(**TEXT, head_dim=16)
    if family == "gemma2":
        return T.Gemma2Config(**TEXT, head_dim=16, sliding_window=16)
    raise ValueError(f"no tiny {family}")


FAMILIES = (
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "internvl", "gemma3", "mistral3", "paligemma",
    "llava_next", "llava_onevision", "qwen3", "gemma2",
)


def build(family: str, seed: int = 0, gains: bool = True):
    """A tiny random model of `family`; with `gains`, every decoder RMSNorm gain is drawn from [0.5, 1.5] (and
    Gemma's (1 + weight) ones likewise), so that carrying or dropping a norm shows."""
    cfg = config(family)
    torch.manual_seed(seed)
    auto = T.AutoModelForImageTextToText if hasattr(cfg, "vision_config") else T.AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    if gains:  # the text decoder's RMSNorms only
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.get_decoder().named_parameters():
                if name.endswith("norm.weight") and param.dim() == 1:
                    offset = 1.0 if "gemma" in type(model).__name__.lower() else 0.0  # Gemma scales by 1 + w
                    param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=generator) - offset)
    return model
