"""The core model package: the Mamba-2 mixer, attention-to-Mamba-2 conversion, the cache wiring
and model I/O. Every subcommand builds on these."""

from .conversion import choose_layers, convert_to_hybrid, find_decoder, hybrid_layers
from .io import load_hybrid, load_model, load_teacher, save_hybrid
from .mamba2 import Mamba2Mixer
from . import kernels
from .mixer_config import Mamba2Config

__all__ = [
    "kernels",
    "Mamba2Config", "Mamba2Mixer", "choose_layers", "convert_to_hybrid", "find_decoder",
    "hybrid_layers", "load_hybrid", "load_model", "load_teacher", "save_hybrid",
]
