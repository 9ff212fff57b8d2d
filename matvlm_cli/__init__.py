"""matvlm: turn a pre-trained vision-language model into a hybrid Mamba-2/Transformer (MaTVLM)."""

from .hybrid import Mamba2Config, Mamba2Mixer, choose_layers, convert_to_hybrid, load_hybrid, load_model, load_teacher, save_hybrid

__version__ = "0.1.0"
__all__ = [
    "Mamba2Config", "Mamba2Mixer", "choose_layers", "convert_to_hybrid", "load_hybrid", "load_model",
    "load_teacher", "save_hybrid",
]
