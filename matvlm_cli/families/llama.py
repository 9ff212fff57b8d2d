"""Llama (and the backbones built on it: SmolLM2 in SmolVLM and Idefics3, Vicuna in LLaVA-1.5)."""

from . import ExportMapping, TextFamily

TEXT = (
    TextFamily(
        model_types=("llama",),
        export=ExportMapping(bias_flag="attention_bias", requires={"mlp_bias": (False, "MLP biases (mlp_bias)")}),
    ),
)
