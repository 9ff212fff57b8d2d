"""`matvlm export`'s recipe (its checks run in the engine, export.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .loading import setting


@dataclass
class ExportRecipe:
    """`matvlm export`: which hybrid to rewrite as a stock transformers model, and where."""

    hybrid: str | None = setting(None, "A hybrid directory written by convert or distill (required).", flag="HYBRID")
    output: str | None = setting(None, "Where to write the stock transformers model (required).")
    overwrite: bool = setting(False, "Replace an output directory matvlm wrote (or an empty one).")
