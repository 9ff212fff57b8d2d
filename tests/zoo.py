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


# -- real processors ---------------------------------------------------------------------------------
# Each VLM family's own processor class and (PIL) image processor class, with small image sizes, and a
# word-level tokenizer built here (tiny.py's words) holding the family's special tokens. Ids 0-3 are
# <unk> <pad> <s> </s> as the configs above say; the tokens the model itself reads (image, video, vision
# start, begin/end of image) sit at the ids the configs give them (250-255); the family's other tokens
# (chat markers, Idefics3's row/column tags) follow the words.

from tiny import WORDS as _WORDS  # noqa: E402

from matvlm_cli.hybrid.processors import images_only  # noqa: E402

QWEN_TOKENS = {250: "<|image_pad|>", 251: "<|video_pad|>", 252: "<|vision_start|>", 253: "<|vision_end|>"}
MODEL_TOKENS = {
    "qwen2_vl": QWEN_TOKENS, "qwen2_5_vl": QWEN_TOKENS, "qwen3_vl": QWEN_TOKENS,
    "idefics3": {250: "<image>"}, "smolvlm": {250: "<image>"},
    "internvl": {250: "<IMG_CONTEXT>", 251: "<img>", 252: "</img>", 253: "<video>"},
    "gemma3": {250: "<image_soft_token>", 251: "<start_of_image>", 252: "<end_of_image>"},
    "mistral3": {250: "[IMG]", 251: "[IMG_BREAK]", 252: "[IMG_END]"},
    "paligemma": {250: "<image>"}, "llava_next": {250: "<image>"}, "llava_onevision": {250: "<image>", 251: "<video>"},
}
IDEFICS_TAGS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]
CHAT_TOKENS = {
    "qwen": ["<|im_start|>", "<|im_end|>"], "idefics3": IDEFICS_TAGS, "smolvlm": IDEFICS_TAGS + ["<|im_start|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"], "mistral3": ["[INST]", "[/INST]"],
}
_CHAT_STYLE = {
    "qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "internvl": "qwen", "llava_onevision": "qwen",
    "idefics3": "idefics3", "smolvlm": "smolvlm", "gemma3": "gemma", "paligemma": "gemma", "mistral3": "mistral3",
    "llava_next": "vicuna",
}


def _parts(image: str, text: str = "{{ part['text'] }}") -> str:
    """Jinja for one message's content: each part, an image part as `image`."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image + "{% elif part['type'] == 'text' %}" + text + "{% endif %}"
        "{% endfor %}{% endif %}"
    )


# Chat templates in each family's style (their real templates, less the system prompts and tool calls).
TEMPLATES = {
    "qwen": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            + _parts("{placeholder}") + "<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "idefics3": "{% for message in messages %}{{ message['role'] | capitalize }}: " + _parts("{placeholder}")
                + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}",
    "smolvlm": "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: " + _parts("{placeholder}")
               + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}",
    "gemma": "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
             + _parts("{placeholder}") + "<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    "mistral3": "<s>{% for message in messages %}{% if message['role'] == 'user' %}[INST]" + _parts("{placeholder}")
                + "[/INST]{% else %}" + _parts("") + "</s>{% endif %}{% endfor %}",
    "vicuna": "{% for message in messages %}{% if message['role'] == 'user' %}USER: " + _parts("{placeholder}\n")
              + " ASSISTANT:{% else %} " + _parts("") + "</s>{% endif %}{% endfor %}",
}


def chat_template(family: str, placeholder: str | None = None) -> str:
    """The family's chat template; an image part renders as `placeholder` (the family's own by default)."""
    placeholder = PLACEHOLDERS[family] if placeholder is None else placeholder
    return TEMPLATES[_CHAT_STYLE[family]].replace("{placeholder}", placeholder)


PLACEHOLDERS = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>\n", "gemma3": "<start_of_image>",
    "mistral3": "[IMG]", "idefics3": "<image>", "smolvlm": "<image>", "paligemma": "<image>", "llava_next": "<image>",
    "llava_onevision": "<image>\n",
}
VLM_FAMILIES = tuple(MODEL_TOKENS)


def tokenizer(family: str):
    """A word-level tokenizer with the family's special tokens at the ids its tiny config uses."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    chat = CHAT_TOKENS.get(_CHAT_STYLE[family], [])
    words = [w for w in _WORDS if w not in specials]
    vocab = {tok: i for i, tok in enumerate(specials + words + chat)}
    assert len(vocab) < 240
    vocab |= {tok: i for i, tok in MODEL_TOKENS[family].items()}
    # every id below VOCAB taken, so tokens a processor adds (PaliGemma's <loc...>) land above the model's vocabulary
    vocab |= {f"<unused{i}>": i for i in range(len(vocab) - len(MODEL_TOKENS[family]), VOCAB) if i not in MODEL_TOKENS[family]}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")
    extra = {
        "qwen": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
                 "vision_end_token": "<|vision_end|>"},
        "internvl": {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>",
                     "video_token": "<video>"},
        "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        "paligemma": {"image_token": "<image>"},
        "llava": {"image_token": "<image>"},
        "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    }
    key = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "llava_next": "llava"}.get(family, family)
    special_tokens = chat + list(MODEL_TOKENS[family].values())
    # added tokens, as in the published tokenizers: SmolVLM's processor, unlike Idefics3's, adds none itself
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=extra.get(key, {}), additional_special_tokens=special_tokens, padding_side="left",
    )
    tok.chat_template = chat_template(family)
    return tok


def processor(family: str):
    """The family's real processor with a tiny word-level tokenizer and its real (PIL) image processor class
    (with no video processor where torchvision is missing: see `images_only`)."""
    tok, template = tokenizer(family), chat_template(family)
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        # 8-pixel patches merged 2x2: a 16-pixel grid, between 2x2 and 8x8 merged tokens
        images = T.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                            max_pixels=64 * 64, **norm) if family != "qwen3_vl" else \
            T.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, **norm)
        cls = {"qwen2_vl": images_only(T.Qwen2VLProcessor), "qwen2_5_vl": images_only(T.Qwen2_5_VLProcessor), "qwen3_vl": images_only(T.Qwen3VLProcessor)}[family]
        return cls(image_processor=images, tokenizer=tok, video_processor=None, chat_template=template)
    if family == "idefics3":
        images = T.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, **norm)
        return T.Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=template)
    if family == "smolvlm":
        images = T.SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, **norm)
        return images_only(T.SmolVLMProcessor)(image_processor=images, tokenizer=tok, video_processor=None, image_seq_len=4, chat_template=template)
    if family == "internvl":
        images = T.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4, **norm)
        return images_only(T.InternVLProcessor)(image_processor=images, tokenizer=tok, video_processor=None, image_seq_length=4, chat_template=template)
    if family == "gemma3":
        images = T.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **norm)
        return T.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4, chat_template=template)
    if family == "mistral3":
        images = T.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8, **norm)
        return T.PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=8, spatial_merge_size=2, chat_template=template)
    if family == "paligemma":
        images = T.SiglipImageProcessorPil(size={"height": 32, "width": 32}, **norm)
        images.image_seq_length = 16
        return T.PaliGemmaProcessor(image_processor=images, tokenizer=tok, chat_template=template)
    if family == "llava_next":
        images = T.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], **norm)
        return T.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                    num_additional_image_tokens=1, chat_template=template)
    if family == "llava_onevision":
        images = T.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], **norm)
        return images_only(T.LlavaOnevisionProcessor)(image_processor=images, tokenizer=tok, video_processor=None, num_image_tokens=16,
                                         vision_feature_select_strategy="full", chat_template=template)
    raise ValueError(f"no processor for {family}")


def save(family: str, directory, seed: int = 0):
    """The tiny model of `family` and its real processor, saved as a teacher directory."""
    from pathlib import Path

    directory = Path(directory)
    model = build(family, seed=seed)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 1, 3
    model.save_pretrained(directory)
    if family in MODEL_TOKENS:
        processor(family).save_pretrained(directory)
    return directory
