"""Qwen3 (also inside InternVL3.5), and Qwen3-VL.

Queries and keys are RMS-normalised per head before RoPE (q_norm, k_norm): they map to RMSNorms on C
and B with the same gains. Qwen3-VL's DeepStack adds visual features to the hidden states of early
decoder layers, outside attention, so a converted layer keeps it.
"""

from . import ModelFamily, TextFamily, mrope_positions
from .qwen2 import qwen_vl_image_processor

TEXT = (
    TextFamily(
        model_types=("qwen3", "qwen3_vl_text"),
        qk_norms=("q_norm", "k_norm"),
        export="q/k norms (Qwen3 normalises queries and keys per head)",
    ),
)
MODELS = (
    ModelFamily(
        model_types=("qwen3_vl",), image_processor=qwen_vl_image_processor,
        image_token_types="mm_token_type_ids", positions=mrope_positions,
    ),
)
