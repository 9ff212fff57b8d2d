"""InternVL (2.5, 3, 3.5 in transformers' layout): InternViT, a pixel-shuffle MLP projector and a Qwen2 /
Qwen3 / Llama decoder. An image is cropped into up to 12 tiles plus a thumbnail (InternVLProcessor
asks its image processor for that), each tile giving image_seq_length tokens."""

from . import ModelFamily, square


def _image_processor(config):
    from transformers import GotOcr2ImageProcessor

    return GotOcr2ImageProcessor(size=square(config.vision_config), min_patches=1, max_patches=12)


MODELS = (ModelFamily(model_types=("internvl",), image_processor=_image_processor, image_kwargs={"crop_to_patches": True}),)
