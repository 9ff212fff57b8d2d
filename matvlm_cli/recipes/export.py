"""`matvlm export`'s recipe (its checks run in the engine, export.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MatvlmError
from .loading import setting


@dataclass
class ExportRecipe:
    """`matvlm export`: which hybrid to rewrite as a stock transformers model, and where."""

    hybrid: str | None = setting(None, "A hybrid directory written by convert or distill (required).", flag="HYBRID")
    output: str | None = setting(None, "Where to write the stock transformers model (required).")
    overwrite: bool = setting(False, "Replace an output directory matvlm wrote (or an empty one).")

    def check(self, source: object = None) -> None:
        if self.hybrid is None:
            raise MatvlmError("Missing argument 'HYBRID' (or 'hybrid' in the recipe): the hybrid directory to export")
        if self.output is None:
            raise MatvlmError("Missing option '--output' / '-o' (or 'output' in the recipe): where to write the export")
