"""Writing a hybrid: its weights and config atomically, with the processor files of its source."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import PreTrainedModel

from ..atomic import atomic_directory
from .layouts import layout_reader
from .processors import PROCESSOR_FILES


def save_hybrid(model: PreTrainedModel, output: str | os.PathLike, source: str | os.PathLike | None = None,
                overwrite: bool = False, state_dict: dict | None = None) -> Path:
    """Write the model (whose config already carries the matvlm block) atomically to `output`,
    with the tokenizer/processor files copied from `source`. `state_dict` replaces the model's own
    weights, e.g. when they are sharded across processes."""
    output = Path(output)
    with atomic_directory(output, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if source is not None and (reader := layout_reader(source)):
            # The source has no processor files of its own: write the one it is read with.
            reader.processor(Path(source)).save_pretrained(tmp)
        elif source is not None:
            for name in PROCESSOR_FILES:
                src = Path(source) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
    return output
