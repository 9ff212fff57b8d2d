"""Qwen2 and Qwen2.5 (also inside LLaVA-OneVision and InternVL), and Qwen2-VL / Qwen2.5-VL.

q/k/v carry biases (dropped unless --keep-bias, as MaTVLM does). Qwen2-VL's 3-D M-RoPE is a position
encoding of the attention layers; a Mamba layer is position-free, so nothing of it needs carrying.
"""

from . import ExportMapping, ModelFamily, TextFamily

_QWEN2_EXPORT = ExportMapping(biased=("q_proj", "k_proj", "v_proj"), requires={"sliding_window": (None, "sliding-window attention")})

TEXT = (
    TextFamily(model_types=("qwen2",), export=_QWEN2_EXPORT),
    TextFamily(
        model_types=("qwen2_vl_text", "qwen2_5_vl_text"),
        export="M-RoPE (GraniteMoeHybrid's attention has 1-D rotary positions only)",
    ),
)
MODELS = (ModelFamily(model_types=("qwen2_vl", "qwen2_5_vl")),)
