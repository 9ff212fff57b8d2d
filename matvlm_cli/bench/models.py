"""The models a bench compares, built one at a time, and their prompts.

Speed does not depend on the weights, so a teacher may be a *preset*: a bundled config of a real
architecture built with random weights directly on the device (no download). Hybrids come from a
directory, or from converting the teacher in memory at a ratio. Only one model is resident at a
time, so each one's peak memory is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig

from ..errors import MatvlmError
from ..hybrid import choose_layers, convert_to_hybrid, load_model
from ..hybrid.conversion import attention_windows
from ..hybrid.io import check_model, load_config, model_class_for
from ..tiny import default_teacher_dir
from .engines import BenchInputs

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
# Config-only presets: architectures to time, not models to use.
PRESETS = ("tinyllava-phi2-siglip-3b", "llava-1.5-7b")


@dataclass
class ModelSpec:
    label: str  # "teacher", "hybrid-0.25", or a directory name
    build: Callable[[], torch.nn.Module]


def default_teacher(device: torch.device) -> str:
    """The paper's teacher shape on a GPU; the embedded tiny teacher on a CPU."""
    return "tinyllava-phi2-siglip-3b" if device.type == "cuda" else str(default_teacher_dir())


def check_teacher(spec: str) -> None:
    if spec in PRESETS:
        return
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise MatvlmError(f"teacher {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a model directory")


def check_models(teacher: str, students: list[str], lengths: list[int], trust_remote_code: bool = False) -> None:
    """Before anything is timed: every model directory is readable (config, weight headers, processor) and
    holds the longest context asked for. A preset is exempt from the length check: its random weights are an
    architecture to time at any length, not a model whose answers beyond its trained positions matter."""
    directories = ([] if teacher in PRESETS else [teacher]) + list(students)
    for path in directories:
        check_model(path, trust_remote_code)
        limit = getattr(load_config(path, trust_remote_code).get_text_config(decoder=True), "max_position_embeddings", None)
        if limit is not None and max(lengths) > limit:
            raise MatvlmError(
                f"{path}: a context of {max(lengths)} tokens (--seq-len plus --gen-len) is beyond its "
                f"max_position_embeddings of {limit}: shorten --seq-len (or --gen-len), or time a preset teacher"
            )


def build_teacher(spec: str, device: torch.device, dtype: torch.dtype, seed: int = 0, trust_remote_code: bool = False):
    """A preset with seeded random weights, or a model directory, on `device` in `dtype`."""
    if spec in PRESETS:
        config = AutoConfig.from_pretrained(PRESETS_DIR / spec)
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_class_for(config).from_config(config, dtype=dtype)
        return model.eval()
    model = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def model_specs(
    teacher: str, students: list[str], ratios: list[float], placement: str, device: torch.device,
    dtype: torch.dtype, seed: int = 0, trust_remote_code: bool = False,
) -> list[ModelSpec]:
    """Teacher first, then each hybrid directory, then the teacher converted at each ratio."""

    def teacher_model():
        return build_teacher(teacher, device, dtype, seed, trust_remote_code)

    def converted(ratio: float):
        def build():
            model = teacher_model()
            windows = attention_windows(model.config.get_text_config(decoder=True))
            layers = choose_layers(len(windows), ratio=ratio, placement=placement, windows=windows)
            convert_to_hybrid(model, layers, seed=seed)
            return model

        return build

    def from_dir(path: str):
        return lambda: load_model(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()

    specs = [ModelSpec("teacher", teacher_model)]
    # distill writes OUT/final, so a directory called "final" is labelled by its run
    specs += [ModelSpec(Path(path).name if Path(path).name != "final" else Path(path).resolve().parent.name, from_dir(path))
              for path in students]
    specs += [ModelSpec(f"hybrid-{ratio:g}", converted(ratio)) for ratio in ratios]
    return specs


def image_token_count(model) -> int:
    """How many tokens one image becomes in the prompt (run the vision tower once to be sure)."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    features = features[0] if isinstance(features, (list, tuple)) else features
    return features.reshape(-1, features.shape[-1]).shape[0]


def bench_inputs(model, seq_len: int, batch: int, image_tokens: int, seed: int = 0) -> BenchInputs:
    """`batch` prompts of `seq_len` tokens: the image's tokens, then random text tokens."""
    config = model.config
    text_config = config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    if image_tokens >= seq_len:
        raise MatvlmError(f"--seq-len {seq_len} is too short: one image alone takes {image_tokens} tokens")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, text_config.vocab_size, (batch, seq_len), generator=generator)
    image_token = getattr(config, "image_token_id", None)
    if image_token is not None:
        ids[ids == image_token] = 10
        ids[:, :image_tokens] = image_token
    pixels = None
    if image_tokens:
        size = config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, generator=generator).to(device, next(model.parameters()).dtype)
    return BenchInputs(ids.to(device), pixels)
