"""Where matvlm keeps things on disk: the presets shipped inside the package (the embedded default
teacher, the sample image, bench's model presets) and the cache of generated worlds and prepared data."""

from __future__ import annotations

import os
from pathlib import Path

PRESETS_DIR = Path(__file__).parent / "presets"


def default_teacher_dir() -> Path:
    """The embedded default teacher shipped inside the package (trained by `python -m matvlm_cli.teacher`)."""
    return PRESETS_DIR / "tiny-teacher"


def cache_dir() -> Path:
    """Where the embedded worlds are generated on first use: $MATVLM_CACHE, else ~/.cache/matvlm."""
    return Path(os.environ.get("MATVLM_CACHE") or Path.home() / ".cache" / "matvlm")
