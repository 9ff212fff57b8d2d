"""Mistral, and Mistral 3 (Mistral-Small-3.x): a Pixtral vision tower next to a Mistral decoder.

Pixtral's vision layers have q/k/v/o projections too; the decoder is named, never searched for.
Mistral 3 sets head_dim explicitly (heads x head_dim != hidden); the mixer takes head_dim as d_state
and headdim, so that needs nothing special.
"""

from . import ExportMapping, ModelFamily, TextFamily


def _image_processor(config):
    """Pixtral's: the image kept at its aspect ratio, its longest edge at most the tower's size, both edges
    multiples of a merged patch."""
    from transformers import PixtralImageProcessor

    vision = config.vision_config
    return PixtralImageProcessor(size={"longest_edge": vision.image_size}, patch_size=vision.patch_size * config.spatial_merge_size)


TEXT = (
    TextFamily(model_types=("mistral",), export=ExportMapping()),
)
MODELS = (ModelFamily(model_types=("mistral3",), image_processor=_image_processor),)
