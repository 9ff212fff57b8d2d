"""Every closed list of choices a setting takes, once: recipes annotate their fields with these, their
checks and the command line's help read the allowed values from them (`choices`)."""

from __future__ import annotations

import typing
from typing import Literal

Placement = Literal["even", "front", "middle", "back"]  # where converted layers go, by position
ConvertPlacement = Literal["even", "front", "middle", "back", "scored"]  # convert can also score layers on data
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cuda", "cpu"]
Engine = Literal["graphs", "hf"]  # bench: static cache + CUDA graphs, or plain generate
Backend = Literal["auto", "torch", "triton", "mamba-ssm", "fla"]  # the mixer's kernels (kernels/__init__.py)
Trainable = Literal["mamba", "mamba+connector", "converted", "all"]
KlPositions = Literal["all", "response"]
LayerLoss = Literal["l2", "mse", "cosine"]
Schedule = Literal["wsd", "cosine", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
Distributed = Literal["ddp", "fsdp"]
Shapes = Literal["padded", "buckets", "packed"]
# `matvlm bench --teacher`'s config-only presets, besides any model directory: architectures to time with random
# weights (each a config.json under presets/, and the published preprocessor_config.json where the family has
# one; sources in presets/README.md).
BENCH_PRESETS = (
    "tinyllava-phi2-siglip-3b", "llava-1.5-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-4b", "internvl3-2b",
    "smolvlm2-2.2b", "gemma-3-4b",
)


def choices(kind) -> tuple[str, ...]:
    """The allowed values of one of the Literals above."""
    return typing.get_args(kind)


def is_choice(annotation) -> bool:
    return typing.get_origin(annotation) is Literal


def choices_in(annotation) -> tuple[str, ...]:
    """The choices of a Literal anywhere in `annotation` (`Engine`, `list[Engine]`, `Trainable | None`);
    () where it has none."""
    if is_choice(annotation):
        return typing.get_args(annotation)
    return next((found for arm in typing.get_args(annotation) if (found := choices_in(arm))), ())
