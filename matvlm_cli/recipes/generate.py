"""`matvlm generate`'s recipe (its checks run in the engine, generate.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MatvlmError
from .loading import setting


@dataclass
class GenerateRecipe:
    """`matvlm generate`: one question about one image, to a teacher or a hybrid."""

    prompt: str | None = setting(None, "The question or instruction (required).")
    image: str | None = setting(None, "An image file.", shown="a sample scene shipped with matvlm")
    model: str | None = setting(None, "A teacher or hybrid directory.", shown="the embedded teacher")
    max_new_tokens: int = setting(64, "Most tokens to generate.")
    temperature: float = setting(0.0, "0 for greedy decoding; above 0 samples.")

    def check(self, source: object = None) -> None:
        if self.prompt is None:
            raise MatvlmError("Missing option '--prompt' (or 'prompt' in the recipe): the question to ask")
