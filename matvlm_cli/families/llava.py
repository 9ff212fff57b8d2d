"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (and TinyLLaVA, which `hybrid.tinyllava` reads as a
LLaVA): a vision tower, a projector, and any text backbone."""

from . import ModelFamily

MODELS = (ModelFamily(model_types=("llava", "llava_next", "llava_onevision", "llava_next_video")),)
