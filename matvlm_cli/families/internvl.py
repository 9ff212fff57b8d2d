"""InternVL (2.5, 3, 3.5 in transformers' layout): InternViT, a pixel-shuffle MLP projector and a Qwen2 /
Qwen3 / Llama decoder."""

from . import ModelFamily

MODELS = (ModelFamily(model_types=("internvl",)),)
