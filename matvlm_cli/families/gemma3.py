"""Gemma 3: q/k norms with Gemma's (1 + weight) gains, 5:1 sliding-window/global layers (read from
`layer_types` by the core), and, in the VLM, bidirectional attention among each image's tokens."""

from . import ModelFamily, TextFamily, square
from .gemma import gemma_gain


def _text_not_carried(config) -> list[str]:
    if getattr(config, "use_bidirectional_attention", False):
        return ["bidirectional attention (use_bidirectional_attention: true): converted layers are causal"]
    return []


def _vlm_not_carried(config) -> list[str]:
    return ["Gemma 3's bidirectional attention among an image's tokens: converted layers read them causally"]


TEXT = (
    TextFamily(
        model_types=("gemma3_text",),
        qk_norms=("q_norm", "k_norm"),
        norm_gain=gemma_gain,
        not_carried=_text_not_carried,
        export="q/k norms and sliding-window layers (Gemma-3)",
    ),
)
def _image_processor(config):
    from transformers import Gemma3ImageProcessor

    return Gemma3ImageProcessor(size=square(config.vision_config))


MODELS = (
    ModelFamily(
        model_types=("gemma3",), not_carried=_vlm_not_carried, image_processor=_image_processor,
        image_token_types="token_type_ids",
    ),
)
