"""Gemma, and PaliGemma (SigLIP + Gemma).

PaliGemma's language model attends as a prefix LM: the image and the prompt see each other both
ways, and only the answer is causal. A converted layer reads them causally.
"""

from . import ModelFamily, TextFamily, square


def gemma_gain(norm):
    """Gemma's RMSNorms scale by (1 + weight)."""
    return 1.0 + norm.weight


def _paligemma(config) -> list[str]:
    return ["PaliGemma's prefix-LM mask (image and prompt attend both ways): converted layers read them causally"]


TEXT = (
    TextFamily(
        model_types=("gemma",),
        export="Gemma's GeGLU MLP (GraniteMoeHybrid's one activation also drives its Mamba convolution, which is SiLU here)",
    ),
)
def _image_processor(config):
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size=square(config.vision_config))


MODELS = (
    ModelFamily(model_types=("paligemma",), not_carried=_paligemma, image_processor=_image_processor,
                prefix_lm_token_types="token_type_ids"),
)
