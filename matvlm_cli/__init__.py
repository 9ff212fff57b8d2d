"""matvlm: turn a pre-trained vision-language model into a hybrid Mamba-2/Transformer (MaTVLM).

The model API is imported on first use, so `python -m matvlm_cli.world` and the CLI's help do not
pay for importing torch and transformers.
"""

import importlib

__version__ = "0.1.0"
_MODEL_API = (
    "Mamba2Config", "Mamba2Mixer", "choose_layers", "convert_to_hybrid", "load_hybrid", "load_model",
    "load_teacher", "save_hybrid",
)
__all__ = list(_MODEL_API)


def __getattr__(name):
    if name in _MODEL_API:
        return getattr(importlib.import_module(".hybrid", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
