"""Idefics3 and SmolVLM: a SigLIP-style tower with pixel shuffle, and a Llama (SmolLM2) decoder that
these wrappers call `text_model`. An image is split into tiles of the tower's size plus a downscaled
whole (`pixel_attention_mask` marks each tile's real pixels), each tile giving its own image tokens."""

from . import ModelFamily, ServeMapping, needs_torchvision


def _image_processor(config):
    """Tiles of the tower's size, from an image resized to at most 4 tiles a side (the published
    Idefics3 / SmolVLM ratio: 1456 = 4 x 364, 1536 = 4 x 384)."""
    from transformers import Idefics3ImageProcessor, SmolVLMImageProcessor

    side = config.vision_config.image_size
    cls = SmolVLMImageProcessor if config.model_type == "smolvlm" else Idefics3ImageProcessor
    return cls(size={"longest_edge": 4 * side}, max_image_size={"longest_edge": side})


def _serve(vllm_class: str) -> ServeMapping:
    # vLLM's Idefics3 (and SmolVLM, its subclass) builds a LlamaModel for the text whatever the config says;
    # the saved names (model.vision_model / connector / text_model, lm_head) are already vLLM's.
    return ServeMapping(vllm_class, fixed_language_model="vllm.model_executor.models.idefics3:LlamaModel")


MODELS = (
    ModelFamily(model_types=("idefics3",), decoder="model.text_model", image_processor=_image_processor,
                serve=_serve("vllm.model_executor.models.idefics3:Idefics3ForConditionalGeneration")),
    ModelFamily(model_types=("smolvlm",), decoder="model.text_model", image_processor=_image_processor,
                serve=needs_torchvision("vLLM's SmolVLM processor also loads SmolVLM's video processor")),
)
