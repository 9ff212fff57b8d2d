"""Tiny random LLaVA models built from configs, one per text family, for the tests. Nothing is
downloaded: the tokenizer is a word-level vocabulary built here, the image processor a SigLIP-style
config. The tests import it as `tiny` (pytest puts tests/ on the path), as they do `zoo`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from matvlm_cli.teacher import CHAT_TEMPLATE, build_processor

IMAGE_SIZE, PATCH_SIZE = 32, 8
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
WORDS = (
    "a an the is are there what which how many in on of image picture word number shown written "
    "yes no red green blue yellow purple orange black white circle square triangle star small "
    "large left right top bottom one two three four five six seven eight nine ten answer question "
    "using single or phrase with option letter from given choices directly A B C D . , ? : USER "
    "ASSISTANT chat between curious user and artificial intelligence assistant"
).split()

TEXT_FAMILIES = {
    "llama": (LlamaConfig, {"num_key_value_heads": 2}),
    "qwen2": (Qwen2Config, {"num_key_value_heads": 2}),
    "mistral": (MistralConfig, {"num_key_value_heads": 2, "sliding_window": None}),
    "phi": (PhiConfig, {"partial_rotary_factor": 0.5}),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_processor() -> LlavaProcessor:
    return build_processor(tiny_tokenizer(), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


def tiny_llava_config(family: str = "llama", num_layers: int = 4) -> LlavaConfig:
    if family not in TEXT_FAMILIES:
        raise ValueError(f"unknown text family {family!r}; choose from {', '.join(TEXT_FAMILIES)}")
    config_class, extra = TEXT_FAMILIES[family]
    tokenizer_size = len(SPECIAL_TOKENS) + len(WORDS)
    text = config_class(
        vocab_size=tokenizer_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=1,
        tie_word_embeddings=False, **extra,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="full", projector_hidden_act="gelu",
    )


def build_tiny_llava(output: str | os.PathLike, family: str = "llama", seed: int = 0, num_layers: int = 4) -> Path:
    """Save a tiny random LLaVA (weights, tokenizer, processor) to `output`."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(family, num_layers)).eval()
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = 3
    output = Path(output)
    model.save_pretrained(output)
    tiny_processor().save_pretrained(output)
    return output

