"""Qwen2 and Qwen2.5 (also inside LLaVA-OneVision and InternVL), and Qwen2-VL / Qwen2.5-VL.

q/k/v carry biases (dropped unless --keep-bias, as MaTVLM does). Qwen2-VL's 3-D M-RoPE is a position
encoding of the attention layers; a Mamba layer is position-free, so nothing of it needs carrying.
"""

from . import ExportMapping, ModelFamily, TextFamily, mrope_positions


def qwen_vl_image_processor(config):
    """Qwen2-VL's image processor at the tower's patch and merge sizes, with its default bounds (4 to 1280
    merged tokens an image) scaled to them."""
    from transformers import Qwen2VLImageProcessor

    vision = config.vision_config
    merged = (vision.patch_size * vision.spatial_merge_size) ** 2
    return Qwen2VLImageProcessor(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": 4 * merged, "longest_edge": 1280 * merged},
    )


_QWEN2_EXPORT = ExportMapping(biased=("q_proj", "k_proj", "v_proj"))

TEXT = (
    TextFamily(model_types=("qwen2",), export=_QWEN2_EXPORT),
    TextFamily(
        model_types=("qwen2_vl_text", "qwen2_5_vl_text"),
        export="M-RoPE (GraniteMoeHybrid's attention has 1-D rotary positions only)",
    ),
)
MODELS = (
    ModelFamily(
        model_types=("qwen2_vl", "qwen2_5_vl"), image_processor=qwen_vl_image_processor,
        image_token_types="mm_token_type_ids", positions=mrope_positions,
    ),
)
