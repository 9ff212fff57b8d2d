"""The `generate` subcommand's engine: answer one question about one image, streaming the tokens.

`check_prompt`, `chat_inputs` and `sampling_options` are also what `matvlm app` answers with, so the page
and this command give the same answer to the same image and prompt."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from threading import Thread

from PIL import Image
from rich.console import Console
from transformers import BatchFeature, TextIteratorStreamer

from .errors import MatvlmError
from .hybrid.checks import check_model
from .hybrid.load import load_model
from .hybrid.processors import load_processor, render_chat
from .images import open_rgb
from .paths import PRESETS_DIR


def check_prompt(processor, prompt: str, what: str = "--prompt") -> None:
    placeholder = getattr(processor, "image_token", None) or "<image>"
    if placeholder in prompt:
        raise MatvlmError(f"{what}: contains {placeholder!r}; leave it out, the one image is placed for you")


def chat_inputs(processor, model, image: Image.Image, prompt: str) -> BatchFeature:
    """One user turn (the image, then the prompt) in the model's own chat template, ready for `generate`."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = render_chat(processor, messages, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt").to(next(model.parameters()).device)


def sampling_options(temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None) -> dict:
    """`generate` keywords: greedy at temperature 0, else sampling; a top_p or top_k left None is the model's
    own generation config (transformers' defaults where it sets none)."""
    if temperature == 0:
        return {"do_sample": False}
    filters = {name: value for name, value in (("top_p", top_p), ("top_k", top_k)) if value is not None}
    return {"do_sample": True, "temperature": temperature, **filters}


def streamed(generate: Callable[[], object], streamer: TextIteratorStreamer) -> Iterator[str]:
    """The streamer's text while `generate`, which feeds it, runs in a thread. What `generate` raises is
    raised here: the stream is ended for it, or the loop over the stream would wait forever."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            generate()
        except BaseException as err:
            failures.append(err)
            streamer.end()

    worker = Thread(target=run, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if failures:
        raise failures[0]


# A scene of the embedded world (a red circle, a blue square, the word "moon"), asked about when no
# --image is given, so that `matvlm generate --prompt ...` works as it comes.
SAMPLE_IMAGE = PRESETS_DIR / "sample-scene.png"


def run_generate(model_dir: Path, image_path: Path | None, prompt: str, max_new_tokens: int = 64,
                 temperature: float = 0.0, console: Console | None = None) -> str:
    console = console or Console()
    if image_path is None:
        image_path = SAMPLE_IMAGE
        console.print(f"No --image given: asking about the sample scene {image_path}", highlight=False)
    check_model(model_dir, images_for="generate")
    if max_new_tokens < 1:
        raise MatvlmError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise MatvlmError(f"--temperature: must be a finite number >= 0, got {temperature}")
    if not image_path.is_file():
        raise MatvlmError(f"{image_path}: no such image file")
    image = open_rgb(image_path)

    processor = load_processor(model_dir)
    check_prompt(processor, prompt)
    model = load_model(model_dir)
    inputs = chat_inputs(processor, model, image, prompt)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = sampling_options(temperature)
    answer = ""
    for piece in streamed(lambda: model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling), streamer):
        answer += piece
        console.print(piece, end="", highlight=False, soft_wrap=True)
    console.print()
    return answer
