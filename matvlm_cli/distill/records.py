"""LLaVA-format records (LLaVA-1.5 mix665k, ShareGPT4V): read, checked and tokenised.

Each record is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}...]}`; a record
with an image holds `<image>` in its first human turn, a text-only record has neither (LLaVA trains on
both). Text goes through the processor's own chat template and labels keep only the assistant turns.
Why a record cannot be used is a `BrokenRecord`; the reasons are counted and reported by id.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..errors import MatvlmError
from ..hybrid.processors import render_chat

IMAGE_TAG = "<image>"


class BrokenRecord(Exception):
    """Why one record cannot be used."""


@dataclass
class SkipReport:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, record_id: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(record_id)

    def merge(self, other: "SkipReport") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            kept = self.examples.setdefault(reason, [])
            kept += other.examples[reason][: max(0, 5 - len(kept))]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        return [f"skipped {n} record(s): {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.items()]

    def to_json(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_json(cls, data: dict) -> "SkipReport":
        return cls(Counter(data["counts"]), data["examples"])


# -- reading -------------------------------------------------------------------------------------

def iter_json_list(path: Path, on_bytes=None, block: int = 1 << 22) -> Iterator[object]:
    """The elements of a JSON list file, one at a time, so that a 1 GB mix never sits in memory as
    Python objects (json.load would hold several GB). `on_bytes(n)`: n bytes have been read."""
    reader = _JsonListReader(path, block)
    if reader.next_char() != "[":
        raise MatvlmError(f"{path}: expected a JSON list of LLaVA-format records")
    reader.position += 1
    if reader.next_char() == "]":
        return
    while True:
        yield reader.element()
        if on_bytes:
            on_bytes(reader.stream.tell())
        separator = reader.next_char()
        if separator == "]":
            return
        if separator != ",":
            reader.fail("expected ',' or ']' between records")
        reader.position += 1


class _JsonListReader:
    """A text buffer over a file that grows by blocks as the JSON decoder needs more."""

    LONGEST_RECORD = 1 << 26  # characters; a record that does not parse within this is broken JSON

    def __init__(self, path: Path, block: int):
        self.path, self.block = path, block
        self.stream = open(path, "rb")
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        self.buffer, self.position, self.lines_before, self.at_end = "", 0, 0, False
        self.refill()

    def refill(self) -> None:
        chunk = self.stream.read(self.block)
        self.at_end = not chunk
        try:
            text = self.utf8.decode(chunk, final=self.at_end)
        except UnicodeDecodeError:
            raise MatvlmError(f"{self.path}: not UTF-8 text (expected a JSON list of LLaVA-format records)") from None
        self.lines_before += self.buffer.count("\n", 0, self.position)
        self.buffer, self.position = self.buffer[self.position :] + text, 0
        if self.at_end:
            self.stream.close()

    def next_char(self) -> str:
        """The next character that is not white space ('' at the end of the file)."""
        while True:
            while self.position < len(self.buffer) and self.buffer[self.position].isspace():
                self.position += 1
            if self.position < len(self.buffer):
                return self.buffer[self.position]
            if self.at_end:
                return ""
            self.refill()

    def element(self):
        self.next_char()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.position)
            except json.JSONDecodeError as err:
                if self.at_end or len(self.buffer) - self.position > self.LONGEST_RECORD:
                    self.position = err.pos
                    self.fail(err.msg)
                self.refill()
                continue
            # A number cut at the buffer's end decodes short: trust only what has more text after it.
            if end < len(self.buffer) or self.at_end:
                self.position = end
                return value
            self.refill()

    def fail(self, message: str):
        line = self.lines_before + self.buffer.count("\n", 0, self.position) + 1
        raise MatvlmError(f"{self.path}: not valid JSON (line {line}: {message})")


# -- encoding ------------------------------------------------------------------------------------

def to_messages(conversations: list[dict], has_image: bool) -> list[dict]:
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise BrokenRecord("a turn is not {from: human|gpt, value: str}")
        value = turn.get("value")
        if turn.get("from") not in ("human", "gpt") or not isinstance(value, str):
            raise BrokenRecord("a turn is not {from: human|gpt, value: str}")
        if i and turn["from"] == conversations[i - 1]["from"]:  # a chat template would run them together or refuse
            raise BrokenRecord(f"two {turn['from']} turns in a row")
        if turn["from"] == "human":
            content = []
            if IMAGE_TAG in value:
                if i != 0:
                    raise BrokenRecord("<image> outside the first human turn")
                if not has_image:
                    raise BrokenRecord("<image> in the text but no 'image' file")
                content.append({"type": "image"})
                value = value.replace(IMAGE_TAG, "").strip()
            messages.append({"role": "user", "content": content + [{"type": "text", "text": value}]})
        else:
            if IMAGE_TAG in value:
                raise BrokenRecord("<image> in an assistant turn")
            messages.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
    if not messages or messages[0]["role"] != "user" or not any(m["role"] == "assistant" for m in messages):
        raise BrokenRecord("no user turn followed by an assistant turn")
    if has_image and not any(part["type"] == "image" for part in messages[0]["content"]):
        raise BrokenRecord("no <image> in the first human turn")
    return messages


def check_image(path: Path) -> None:
    """Only that the file is there: even reading the header costs 0.2 ms, a minute of a 665k preparation.
    Unreadable and oversized images are caught, counted and reported by id when their batch is built."""
    if not path.is_file():
        raise BrokenRecord("missing image file")


def compile_chat_template(processor):
    """The processor's chat template compiled once, as transformers renders templates (trim_blocks,
    lstrip_blocks, loop controls, sandboxed). `processor.apply_chat_template` costs about 0.2 ms of
    set-up per call, which dominates a multi-turn record; this renders in about 15 µs. `RecordEncoder`
    checks it against the processor on the first records and uses the processor's own if they differ."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(processor.chat_template)
    special = dict(processor.tokenizer.special_tokens_map)
    return lambda messages, add_generation_prompt=False: template.render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special
    )


# Private-use characters that wrap each assistant message's text for one marked rendering.
BEGIN, END = "\ue000", "\ue001"


class RecordEncoder:
    """Token ids and assistant-turn spans of one record, with the conversation rendered and tokenised
    once. A label span runs from the end of the turn's generation prompt to the end of its message (the
    model learns to close its turn). Those character positions come from one extra rendering with each
    assistant text wrapped in markers, plus the template's fixed end-of-turn text; on the first records
    they are checked against the definition (rendering every prefix), and a template for which they
    differ, or a record on which the markers do not come back intact, takes the exact way."""

    CHECKS = 16  # records whose fast rendering and spans are compared with the exact ones

    def __init__(self, processor, max_length: int, image_tokens: int, skip_text_only: bool = False):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.max_length, self.image_tokens, self.skip_text_only = max_length, image_tokens, skip_text_only
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_placeholder(processor))
        self.backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self.checked = 0
        try:
            self.render = compile_chat_template(processor)
            # What an assistant message adds around its text beyond the generation prompt: in the embedded
            # template the prompt ends "ASSISTANT:" and the message renders " text</s>".
            prompt = self.render([_user("q")], add_generation_prompt=True)
            probe = self.render([_user("q"), _assistant(BEGIN + "a" + END)])
            self.start_of_turn = probe[len(prompt) : probe.index(BEGIN)] if probe.startswith(prompt) else None
            self.end_of_turn = probe[probe.index(END) + 1 :]
            if self.start_of_turn is None:
                self.render = None
        except Exception:  # a template jinja alone cannot render: the processor's own, slow way
            self.render = None

    def _exact(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """By definition: the full text and, for each assistant turn j, [len(prefix j with generation
        prompt), len(prefix j + 1))."""
        render = lambda m, prompt=False: render_chat(self.processor, m, add_generation_prompt=prompt)  # noqa: E731
        full, spans = render(messages), []
        for j, message in enumerate(messages):
            if message["role"] == "assistant":
                start, through = render(messages[:j], True), render(messages[: j + 1])
                if not full.startswith(through) or len(start) > len(through):
                    raise BrokenRecord("the chat template does not render a conversation as its prefixes")
                spans.append((len(start), len(through)))
        return full, spans

    def _marked(self, messages) -> tuple[str, list[tuple[int, int]]] | None:
        if any(BEGIN in part.get("text", "") or END in part.get("text", "") for m in messages for part in m["content"]):
            return None
        full = self.render(messages)
        marked = self.render([_assistant(BEGIN + m["content"][0]["text"] + END) if m["role"] == "assistant" else m for m in messages])
        pieces, spans, length, at = [], [], 0, 0
        while (begin := marked.find(BEGIN, at)) >= 0:
            end = marked.find(END, begin)
            if end < 0:
                return None
            pieces += [marked[at:begin], marked[begin + 1 : end]]
            start = length + begin - at
            length = start + end - begin - 1
            spans.append((start - len(self.start_of_turn), length + len(self.end_of_turn)))
            at = end + 1
        pieces.append(marked[at:])
        turn_ends = (self.start_of_turn, self.end_of_turn)
        if "".join(pieces) != full or any(
            (full[s : s + len(turn_ends[0])], full[e - len(turn_ends[1]) : e]) != turn_ends for s, e in spans
        ):
            return None
        return full, spans

    def text_and_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        fast = self._marked(messages) if self.render is not None else None
        if fast is None or self.checked < self.CHECKS:
            exact = self._exact(messages)
            if fast is not None:
                self.checked += 1
                if fast != exact:
                    self.render = None  # this template's turns are not marker-and-suffix shaped
            return exact
        return fast

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and each token's first character, as the tokenizer's own call gives them."""
        if self.backend is not None:  # the Rust tokenizer directly: a third of the Python wrapper's cost
            encoding = self.backend.encode(text)
            return np.asarray(encoding.ids, dtype=np.int32), np.asarray([s for s, _ in encoding.offsets], dtype=np.int64)
        encoding = self.tokenizer(text, return_offsets_mapping=True)
        return np.asarray(encoding["input_ids"], dtype=np.int32), np.asarray([s for s, _ in encoding["offset_mapping"]], dtype=np.int64)

    def encode(self, record, image_root: Path) -> dict:
        if not isinstance(record, dict):
            raise BrokenRecord("not a JSON object")
        if not isinstance(record.get("conversations"), list):
            raise BrokenRecord("no conversations list")
        image = record.get("image")
        if image is not None and not (isinstance(image, str) and image):
            raise BrokenRecord("'image' is not a file path")
        if image is None and self.skip_text_only:
            raise BrokenRecord("text-only (skip_text_only: true)")
        messages = to_messages(record["conversations"], has_image=image is not None)
        if image is not None:
            check_image(image_root / image)
        full, spans = self.text_and_spans(messages)
        ids, starts = self.tokenize(full)
        n_images = int((ids == self.image_token_id).sum()) if image is not None else 0
        if image is not None and n_images != 1:
            raise BrokenRecord(f"the chat template gave {n_images} image placeholders ({image_placeholder(self.processor)}) for one image")
        length = len(ids) + (self.image_tokens - 1) * n_images
        if length > self.max_length:
            raise BrokenRecord(f"longer than model_max_length ({self.max_length} tokens)")
        token_spans = [(int(np.searchsorted(starts, s)), int(np.searchsorted(starts, e))) for s, e in spans]
        if all(b <= a for a, b in token_spans):
            raise BrokenRecord("no assistant tokens after templating")
        return {"image": image, "input_ids": ids, "label_spans": np.asarray(token_spans, dtype=np.int32).ravel(), "length": length}


def _user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def image_placeholder(processor) -> str:
    """The text the processor expands into an image's tokens (LLaVA's `<image>`, Qwen-VL's `<|image_pad|>`,
    Gemma 3's `<start_of_image>`, InternVL's `<IMG_CONTEXT>`...): the chat template renders it once per image."""
    return getattr(processor, "image_token", None) or IMAGE_TAG


# What a processor gives that is not an input of the model's forward: PaliGemma's processor makes labels.
NOT_MODEL_INPUTS = ("labels",)


class ImageInputs:
    """One image as the processor gives it: the token ids its placeholder expands into (a size-dependent
    number for Qwen-VL, Idefics3, LLaVA-NeXT/OneVision, InternVL; framed by other tokens for Idefics3's rows
    and columns, Gemma 3's start/end of image, InternVL's <img></img>), the per-token inputs over those ids
    (token types) and the image tensors (pixel_values, image_grid_thw, image_sizes, pixel_attention_mask...).

    Prepared records keep one placeholder token per image; each is spliced into the processor's own
    expansion when the record is read. A processor whose expansion is the same run of placeholder tokens
    at every image size and whose only image tensor is a fixed-shape `pixel_values` (LLaVA-1.5, the
    embedded teacher) is `fixed`: its records are expanded by repetition and its images go through the
    image processor alone, as they always have."""

    PROBES = ((32, 32), (80, 48))  # (width, height): two aspect ratios, so a size-dependent count shows

    def __init__(self, processor):
        self.processor = processor
        self.placeholder = image_placeholder(processor)
        self.placeholder_id = processor.tokenizer.convert_tokens_to_ids(self.placeholder)
        probes = [self.expand(Image.new("RGB", size)) for size in self.PROBES]
        ids = [p[0] for p in probes]
        self.probe_length = len(ids[0])  # a record's length before its image is read, as prepare counts it
        self.fixed = (
            all(np.array_equal(ids[0], other) for other in ids) and bool((ids[0] == self.placeholder_id).all())
            and all(set(tensors) == {"pixel_values"} and not per_token for _, per_token, tensors in probes)
            and len({tuple(t["pixel_values"].shape) for _, _, t in probes}) == 1 and probes[0][2]["pixel_values"].shape[0] == 1
        )

    def expand(self, image) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        """(ids of the placeholder's expansion, per-token inputs over them, image tensors) for one image."""
        out = self.processor(images=[image], text=[self.placeholder], return_tensors="pt", add_special_tokens=False)
        ids = out["input_ids"][0].numpy().astype(np.int64)
        per_token, tensors = {}, {}
        for key, value in out.items():
            if key in ("input_ids", "attention_mask") or key in NOT_MODEL_INPUTS:
                continue
            if value.dim() == 2 and tuple(value.shape) == (1, len(ids)) and not value.is_floating_point():
                per_token[key] = value[0].numpy()
            else:
                tensors[key] = value
        return ids, per_token, tensors


def image_token_count(processor) -> int:
    """Tokens one 32x32 image takes in the processor's expansion (exact for a `fixed` processor)."""
    return ImageInputs(processor).probe_length
