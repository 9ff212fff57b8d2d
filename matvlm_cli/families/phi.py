"""Phi-2 (TinyLLaVA's and MaTVLM's backbone): the output projection is `dense`, and attention and MLP
read one LayerNorm output in parallel (the decoder layer's own code keeps that wiring)."""

from . import TextFamily


def _not_carried(config) -> list[str]:
    if getattr(config, "qk_layernorm", False):
        return ["q/k LayerNorms (qk_layernorm: true): LayerNorms with biases, which the mixer's B/C norms are not"]
    return []


TEXT = (
    TextFamily(
        model_types=("phi",),
        output_projection="dense",
        not_carried=_not_carried,
        export="Phi's parallel block (attention and MLP read one LayerNorm output), LayerNorm biases and partial rotary embedding",
    ),
)
