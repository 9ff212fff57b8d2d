"""`matvlm evaluate`'s recipe (its checks run in the engine: evaluate/run.py's `check_recipe`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import Device
from .loading import setting


@dataclass
class EvaluateRecipe:
    """`matvlm evaluate`: which models, which benchmarks on which data, where the results go."""

    models: list[str] | None = setting(
        None, "Teacher or hybrid directory; repeat to compare side by side.", flag="--model", shown="the embedded teacher")
    tasks: list[str] = setting(help="pope, mmmu, textvqa, or any lm-eval task name or task YAML.",
                               factory=lambda: ["pope", "mmmu", "textvqa"])
    data_dir: str | None = setting(None, "Folder with pope/, mmmu/, textvqa/ (hub parquet or save_to_disk).",
                                   shown="the embedded synthetic sets")
    limit: int | None = setting(None, "Only the first N documents of each task (for quick checks).")
    batch_size: int = setting(16, "Prompts per forward pass.")
    output: str = setting("runs/evaluate", "Results folder.")
    ocr: bool = setting(False, "TextVQA: add the reference OCR tokens to the prompt (LLaVA-1.5 / TinyLLaVA protocol).")
    device: Device = setting("auto", "Where the models run.")
