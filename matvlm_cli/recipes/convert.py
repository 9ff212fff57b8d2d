"""`matvlm convert`'s recipe (its checks run in the engine, convert.py, where the teacher is read)."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import ConvertPlacement, Dtype
from .loading import setting


@dataclass
class ConvertRecipe:
    """`matvlm convert`: which teacher, which layers, where to write the hybrid."""

    teacher: str | None = setting(None, "Teacher model directory.", shown="the embedded tiny teacher")
    output: str | None = setting(None, "Where to write the hybrid.", shown="./<teacher>-hybrid-<ratio>-<placement>")
    ratio: float | None = setting(0.25, "Fraction of decoder layers to replace, in (0, 1].")
    placement: ConvertPlacement = setting(
        "even", "Where the converted layers go; scored = the k layers whose conversion costs least on calibration data.")
    layers: list[int] | None = setting(None, "Explicit layer indices, e.g. 0,4,8 (overrides --ratio and --placement).")
    count: int | None = setting(None, "How many layers to replace (instead of --ratio).")
    calibration: str | None = setting(None, "--placement scored: a LLaVA-format data JSON.", shown="the embedded world")
    calibration_images: str | None = setting(None, "Folder the calibration JSON's images are relative to.",
                                             shown="the JSON's folder")
    calibration_records: int = setting(64, "Image records drawn (by --seed) to score layers on.")
    keep_bias: bool = setting(False, "Carry attention biases into the mixer (q/k/v/o into in_proj/out_proj; MaTVLM drops them).")
    chunk_size: int = setting(128, "Chunk length of the mixer's chunked scan.")
    seed: int = setting(0, "Seed for the Mamba-2 parameters not taken from attention.")
    dtype: Dtype = setting("auto", "Weights' dtype while converting.")
    overwrite: bool = setting(False, "Replace an output directory matvlm wrote (or an empty one).")
    trust_remote_code: bool = setting(False, "Allow the teacher's own modelling code.")
