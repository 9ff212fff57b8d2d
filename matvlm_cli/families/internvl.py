"""InternVL (2.5, 3, 3.5 in transformers' layout): InternViT, a pixel-shuffle MLP projector and a Qwen2 /
Qwen3 / Llama decoder. An image is cropped into up to 12 tiles plus a thumbnail (InternVLProcessor
asks its image processor for that), each tile giving image_seq_length tokens."""

from . import ModelFamily, needs_torchvision, square


def _image_processor(config):
    from transformers import GotOcr2ImageProcessor

    return GotOcr2ImageProcessor(size=square(config.vision_config), min_patches=1, max_patches=12)


MODELS = (ModelFamily(
    model_types=("internvl",), image_processor=_image_processor, image_kwargs={"crop_to_patches": True},
    # vLLM 0.32 serves transformers' InternVL with its InternS1 class (vllm/model_executor/models/interns1.py)
    serve=needs_torchvision("vLLM serves this family with its InternS1 class, whose module imports transformers' "
                            "InternVL video processor"),
),)
