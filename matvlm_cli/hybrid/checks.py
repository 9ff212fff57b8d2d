"""Checks that fail early, with one line naming what is wrong: a model directory checked without
reading its weights, and the device a subcommand is asked to run on."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForImageTextToText

from ..errors import MatvlmError
from .layouts import FILE_ERRORS, first_line, load_config, model_class_for, weight_files
from .processors import load_processor


def check_model(path: str | os.PathLike, trust_remote_code: bool = False, processor: bool = True,
                images_for: str | None = None) -> None:
    """Everything about a teacher or hybrid directory that can be checked without reading its weights:
    the config, the architecture built on the meta device, the weight files' headers and (unless
    `processor` is False: bench reads no text, only images) the processor. `images_for` (what needs
    images, e.g. "generate"): a text-only model is refused, rather than failing on its processor."""
    config = load_config(path, trust_remote_code)
    if images_for and model_class_for(config) is not AutoModelForImageTextToText:
        architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
        raise MatvlmError(f"{path}: a text-only model ({architecture}); {images_for} needs a vision-language model")
    try:
        with torch.device("meta"):
            model_class_for(config).from_config(config, trust_remote_code=trust_remote_code)
    except (*FILE_ERRORS, RuntimeError) as err:
        raise MatvlmError(f"{path}/config.json: the model cannot be built from it: {first_line(err)}") from None
    weight_files(path)
    if processor:
        load_processor(path, trust_remote_code)


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when visible, else CPU), `cuda` or `cpu`; asking for an absent GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MatvlmError("--device cuda: no CUDA GPU is available (use cpu or auto)")
    return torch.device(device)
