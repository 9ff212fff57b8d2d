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
