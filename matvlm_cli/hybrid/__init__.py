"""The core model package: the Mamba-2 mixer, attention-to-Mamba-2 conversion, the cache wiring
and model reading and writing (layouts, processors, checks, load, saving). Every subcommand builds on these."""

from .conversion import choose_layers, convert_to_hybrid, find_decoder, hybrid_layers
from .load import load_hybrid, load_model, load_teacher
from .mamba2 import Mamba2Mixer
from .mixer_config import Mamba2Config
from .saving import save_hybrid

__all__ = [
    "Mamba2Config", "Mamba2Mixer", "choose_layers", "convert_to_hybrid", "find_decoder",
    "hybrid_layers", "load_hybrid", "load_model", "load_teacher", "save_hybrid",
]
