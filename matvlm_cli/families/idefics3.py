"""Idefics3 and SmolVLM: a SigLIP-style tower with pixel shuffle, and a Llama (SmolLM2) decoder that
these wrappers call `text_model`."""

from . import ModelFamily

MODELS = (ModelFamily(model_types=("idefics3", "smolvlm"), decoder="model.text_model"),)
