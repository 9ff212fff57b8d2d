"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (and TinyLLaVA, which `hybrid.tinyllava` reads as a
LLaVA): a vision tower, a projector, and any text backbone. LLaVA-1.5 sees one square crop; NeXT and
OneVision add tiles at the best of `image_grid_pinpoints` (`image_sizes` says each image's size), so an
image's token count depends on its size."""

from . import ModelFamily, ServeMapping, needs_torchvision, square

# transformers 5 saves a CLIP or SigLIP tower flat (`vision_tower.embeddings...`); vLLM's towers keep
# them under `vision_model.` and its LLaVA classes map only the `model.` prefix away.
_FLAT_TOWER = ((r"^(model\.)?vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),)


def _side(config) -> int:
    return square(config.vision_config)["height"]


def _llava(config):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": _side(config)}, crop_size=square(config.vision_config))


def _next(config):
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(
        size={"shortest_edge": _side(config)}, crop_size=square(config.vision_config), image_grid_pinpoints=config.image_grid_pinpoints,
    )


def _onevision(config):
    from transformers import LlavaOnevisionImageProcessor

    return LlavaOnevisionImageProcessor(size=square(config.vision_config), image_grid_pinpoints=config.image_grid_pinpoints)


MODELS = (
    ModelFamily(
        model_types=("llava",), image_processor=_llava,
        serve=ServeMapping("vllm.model_executor.models.llava:LlavaForConditionalGeneration", _FLAT_TOWER),
    ),
    ModelFamily(
        model_types=("llava_next", "llava_next_video"), image_processor=_next,
        serve=ServeMapping("vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration", _FLAT_TOWER),
    ),
    ModelFamily(model_types=("llava_onevision",), image_processor=_onevision,
                serve=needs_torchvision("vLLM loads LLaVA-OneVision's processor with its video processor")),
)
