"""Mistral, and Mistral 3 (Mistral-Small-3.x): a Pixtral vision tower next to a Mistral decoder.

Pixtral's vision layers have q/k/v/o projections too; the decoder is named, never searched for.
Mistral 3 sets head_dim explicitly (heads x head_dim != hidden); the mixer takes head_dim as d_state
and headdim, so that needs nothing special.
"""

from . import ExportMapping, ModelFamily, TextFamily

TEXT = (
    TextFamily(model_types=("mistral",), export=ExportMapping(requires={"sliding_window": (None, "sliding-window attention")})),
)
MODELS = (ModelFamily(model_types=("mistral3",)),)
