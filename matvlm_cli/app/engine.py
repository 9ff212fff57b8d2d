"""The app's models, each loaded once, and their answers streamed with time to first token and tokens/s.

No web code here: `page` shows what `stream_answer` yields. Answers are built with `generate`'s own
`chat_inputs` and `sampling_options`, so greedy answers equal `matvlm generate`'s."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedModel, TextIteratorStreamer

from ..convert import default_output
from ..errors import MatvlmError
from ..generate import chat_inputs, check_prompt, sampling_options, streamed
from ..hybrid.conversion import attention_windows, choose_layers, convert_to_hybrid, hybrid_layers
from ..hybrid.load import load_model, load_teacher
from ..hybrid.processors import load_processor
from ..paths import default_teacher_dir
from ..recipes import ConvertRecipe


@dataclass
class AppModel:
    """One column of the page: a loaded model, its processor (and so its chat template), its Mamba layers."""

    name: str
    origin: str  # where it came from, shown under the name
    model: PreTrainedModel
    processor: object
    mamba_layers: list[int]
    num_layers: int

    def layers_line(self) -> str:
        if not self.mamba_layers:
            return f"Mamba-2 layers: none (all {self.num_layers} layers attention)"
        return f"Mamba-2 layers: {', '.join(map(str, self.mamba_layers))} ({len(self.mamba_layers)} of {self.num_layers})"


def column_names(paths: list[Path]) -> list[str]:
    """Each folder's name, or its whole path where two folders share a name."""
    names = [path.name for path in paths]
    return [str(path) if names.count(name) > 1 else name for path, name in zip(paths, names)]


def _app_model(name: str, origin: str, model: PreTrainedModel, processor) -> AppModel:
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return AppModel(name, origin, model, processor, hybrid_layers(model), num_layers)


def load_app_model(path: Path, name: str) -> AppModel:
    return _app_model(name, str(path), load_model(path), load_processor(path))


def embedded_hybrid() -> AppModel:
    """The embedded teacher converted in memory exactly as `matvlm convert` converts it by default
    (0.25, even, seed 0): the same weights its output folder would hold, with nothing written."""
    recipe, teacher_dir = ConvertRecipe(), default_teacher_dir()
    model = load_teacher(teacher_dir)
    text_config = model.config.get_text_config(decoder=True)
    num_layers = text_config.num_hidden_layers
    layers = choose_layers(num_layers, recipe.ratio, recipe.placement, None, attention_windows(text_config))
    convert_to_hybrid(
        model, layers, keep_bias=recipe.keep_bias, seed=recipe.seed, chunk_size=recipe.chunk_size,
        source=str(teacher_dir), ratio=len(layers) / num_layers, placement=recipe.placement,
    )
    origin = "the embedded teacher converted in memory (convert's defaults), not distilled"
    return _app_model(default_output(recipe, teacher_dir).name, origin, model, load_processor(teacher_dir))


def default_models() -> list[AppModel]:
    teacher_dir = default_teacher_dir()
    teacher = load_app_model(teacher_dir, teacher_dir.name)
    teacher.origin = "the embedded teacher, trained on the synthetic world"
    return [teacher, embedded_hybrid()]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: the model's own generation config
    top_k: int = 0  # 0: the model's own generation config
    seed: int = 0  # sampling only: each model starts from this seed

    def check(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise MatvlmError(f"most new tokens: must be a whole number of at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise MatvlmError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MatvlmError(f"top-p: must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise MatvlmError(f"top-k: must be a whole number >= 0, got {self.top_k}")


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int
    first_token_s: float | None  # from the question (preprocessing included) to the first generated token
    tokens_per_s: float | None  # decoding after the first token
    seconds: float
    done: bool

    def stats_line(self) -> str:
        if self.first_token_s is None:
            return "prefilling..."
        rate = "-" if self.tokens_per_s is None else f"{self.tokens_per_s:.1f}"
        return (f"{self.first_token_s:.2f} s to first token · {rate} tokens/s · "
                f"{self.tokens} tokens in {self.seconds:.2f} s" + ("" if self.done else " ..."))


class _TimedStreamer(TextIteratorStreamer):
    """A text streamer that also notes when each generated token arrived."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.token_times: list[float] = []

    def put(self, value):
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.token_times.extend([time.perf_counter()] * value.numel())  # batch 1: one token a step
        super().put(value)


def stream_answer(app_model: AppModel, image: Image.Image, prompt: str, sampling: Sampling = Sampling()) -> Iterator[Answer]:
    """Answer one question about one image, yielding the answer so far after each piece of text."""
    check_prompt(app_model.processor, prompt, what="question")
    sampling.check()
    start = time.perf_counter()
    inputs = chat_inputs(app_model.processor, app_model.model, image, prompt)
    streamer = _TimedStreamer(app_model.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = sampling_options(sampling.temperature, None if sampling.top_p == 1 else sampling.top_p, sampling.top_k or None)

    def generate() -> None:
        if options["do_sample"]:
            torch.manual_seed(sampling.seed)
        app_model.model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, streamer=streamer, **options)

    def answer(text: str, done: bool) -> Answer:
        times = list(streamer.token_times)
        first = times[0] - start if times else None
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        return Answer(text, len(times), first, rate, time.perf_counter() - start, done)

    text = ""
    for piece in streamed(generate, streamer):
        text += piece
        yield answer(text, done=False)
    yield answer(text, done=True)
