"""Reading a model directory, whatever layout it was published in: its config, its weight files and
the transformers auto class that builds it.

Directories published in another layout (TinyLLaVA's, MaTVLM's releases) are read through a
`LayoutReader`, here and nowhere else, so every subcommand takes them as it takes a transformers one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from ..errors import MatvlmError
from . import tinyllava
from .conversion import HYBRID_KEY
from .mixer_config import Mamba2Config


@dataclass(frozen=True)
class LayoutReader:
    """A model directory published in a layout other than transformers' own, read as a transformers model:
    `config(path, weight_files)` gives its transformers config (with a matvlm block for a hybrid),
    `state_dict(path, weight_files, config, model_keys, attention_name)` its weights under the model's names,
    `processor(path)` its processor."""

    name: str
    identifies: Callable[[Path], bool]
    config: Callable
    state_dict: Callable
    processor: Callable


LAYOUT_READERS = (
    LayoutReader("MaTVLM hybrid", tinyllava.is_matvlm_release_dir, tinyllava.matvlm_release_config,
                 tinyllava.tinyllava_state_dict, tinyllava.tinyllava_processor),
    LayoutReader("TinyLLaVA", tinyllava.is_tinyllava_dir, tinyllava.tinyllava_config,
                 tinyllava.tinyllava_state_dict, tinyllava.tinyllava_processor),
)


def layout_reader(path: str | os.PathLike) -> LayoutReader | None:
    """The reader for a directory in a published non-transformers layout, or None for a transformers one."""
    return next((reader for reader in LAYOUT_READERS if reader.identifies(Path(path))), None)


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise MatvlmError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise MatvlmError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise MatvlmError(f"{path}: not a model directory (no config.json)")
    return path


def first_line(err: BaseException) -> str:
    """The part of a library's message that says what is wrong: its first sentence (a strict config's
    validation error says it on its last line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return re.split(r"(?<=\.)\s", lines[-1] if isinstance(err, StrictDataclassError) else lines[0])[0]


# What reading a user's config, processor or weights raises when the files are wrong (transformers'
# configs are strict dataclasses: a wrong-typed value is a StrictDataclassError).
FILE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OSError, StrictDataclassError, SafetensorError)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def load_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """The directory's config, with its matvlm block (if any) checked against the model it describes."""
    path = check_model_dir(path)
    if reader := layout_reader(path):
        config = reader.config(path, weight_files(path))
    else:
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except FILE_ERRORS as err:
            raise MatvlmError(f"{path}/config.json: cannot be read as a transformers config: {first_line(err)}") from None
    if getattr(config, HYBRID_KEY, None):
        check_hybrid_block(path, config)
    return config


def check_hybrid_block(path: Path, config) -> None:
    """A hand-edited or foreign matvlm block fails here, naming what is wrong, rather than deep inside
    model building: its layers must be distinct decoder layers the model has, its mixer a Mamba2Config."""
    block, where = getattr(config, HYBRID_KEY), f"{path}/config.json: '{HYBRID_KEY}'"
    layers = block.get("layers") if isinstance(block, dict) else None
    count = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise MatvlmError(f"{where}.layers must be a list of layer indices, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise MatvlmError(f"{where}.layers {layers} names a layer twice")
    missing = [i for i in layers if isinstance(count, int) and not 0 <= i < count]
    if missing:
        raise MatvlmError(f"{where}.layers names layer {missing[0]}, which the model lacks (its {count} decoder layers are 0..{count - 1})")
    try:
        Mamba2Config.from_dict(block["mixer"])
    except (KeyError, TypeError, ValueError) as err:
        raise MatvlmError(f"{where}.mixer is not a Mamba-2 mixer's settings: {first_line(err)}") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The directory's safetensors files, each checked readable (header and length); pickle weights are
    refused, never loaded: unpickling runs code from the file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise MatvlmError(f"{index}: not a safetensors index ({first_line(err)})") from None
        files = [path / name for name in names]
    else:
        files = [path / "model.safetensors"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        pickles = [name for name in PICKLE_WEIGHTS if (path / name).is_file()] or sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            raise MatvlmError(
                f"{path}: has only pickle weights ({pickles[0]}), and matvlm reads safetensors only. If you trust the "
                f"file, convert it once: python -c \"from transformers import AutoModelForImageTextToText as M; "
                f"M.from_pretrained('{path}').save_pretrained('{path}')\" (AutoModelForCausalLM for a text-only model)"
            )
        raise MatvlmError(f"{missing[0]}: not found (config.json is there, the weights are not)")
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise MatvlmError(f"{file}: not a readable safetensors file ({first_line(err)})") from None
    return files


def model_class_for(config):
    """Image-text-to-text for VLMs, causal LM for text-only decoders."""
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto_class._model_mapping:
            return auto_class
    raise MatvlmError(
        f"unsupported architecture {config.model_type!r}: not a transformers image-text-to-text or causal LM model"
    )
