"""LLaVA-format conversation data (LLaVA-1.5 mix665k, ShareGPT4V) for distillation.

Each record is `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}`; the
first human turn holds `<image>` when the record has an image. Text goes through the processor's
own chat template, and labels keep only the assistant turns. Broken records are skipped, counted
and reported by id, never silently.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import MatvlmError

IMAGE_TAG = "<image>"


class BrokenRecord(Exception):
    """Why one record cannot be used."""


@dataclass
class Encoded:
    id: str
    image: Path
    input_ids: list[int]
    labels: list[int]


@dataclass
class SkipReport:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, record_id: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(record_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        return [f"skipped {n} record(s): {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.items()]


def to_messages(conversations: list[dict]) -> list[dict]:
    messages = []
    for i, turn in enumerate(conversations):
        value = turn.get("value")
        if turn.get("from") not in ("human", "gpt") or not isinstance(value, str):
            raise BrokenRecord("a turn is not {from: human|gpt, value: str}")
        if turn["from"] == "human":
            content = []
            if IMAGE_TAG in value:
                if i != 0:
                    raise BrokenRecord("<image> outside the first human turn")
                content.append({"type": "image"})
                value = value.replace(IMAGE_TAG, "").strip()
            messages.append({"role": "user", "content": content + [{"type": "text", "text": value}]})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
    if not messages or messages[0]["role"] != "user" or not any(m["role"] == "assistant" for m in messages):
        raise BrokenRecord("no user turn followed by an assistant turn")
    return messages


def encode_record(record: dict, image_root: Path, processor, max_length: int, image_tokens: int) -> Encoded:
    """Token ids and labels (-100 except on assistant turns) of one record."""
    record_id = str(record.get("id", "?"))
    if not isinstance(record.get("conversations"), list):
        raise BrokenRecord("no conversations list")
    if not record.get("image"):
        raise BrokenRecord("no image (text-only records are not used for VLM distillation)")
    image = image_root / record["image"]
    if not image.is_file():
        raise BrokenRecord("missing image file")
    messages = to_messages(record["conversations"])
    if not any(part["type"] == "image" for part in messages[0]["content"]):
        raise BrokenRecord("no <image> in the first human turn")
    tokenizer = processor.tokenizer

    def token_count(text: str) -> int:
        return len(tokenizer(text)["input_ids"]) + (image_tokens - 1) * text.count(IMAGE_TAG)

    full = processor.apply_chat_template(messages)
    ids = tokenizer(full.replace(IMAGE_TAG, IMAGE_TAG * image_tokens))["input_ids"]
    if len(ids) > max_length:
        raise BrokenRecord(f"longer than model_max_length ({len(ids)} > {max_length} tokens)")
    labels = [-100] * len(ids)
    for j, message in enumerate(messages):
        if message["role"] == "assistant":
            start = token_count(processor.apply_chat_template(messages[:j], add_generation_prompt=True))
            end = token_count(processor.apply_chat_template(messages[: j + 1]))
            labels[start:end] = ids[start:end]
    if all(label == -100 for label in labels):
        raise BrokenRecord("no assistant tokens after templating")
    return Encoded(record_id, image, ids, labels)


def image_token_count(processor) -> int:
    probe = processor(images=[Image.new("RGB", (32, 32))], text=[IMAGE_TAG], return_tensors="pt")
    return int((probe["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TAG)).sum())


def read_records(path: Path) -> list[dict]:
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MatvlmError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(records, list):
        raise MatvlmError(f"{path}: expected a JSON list of LLaVA-format records")
    return records


class ConversationDataset(Dataset):
    """A weighted mix of LLaVA-format sources, encoded up front so broken records surface early."""

    def __init__(self, sources, processor, max_length: int, seed: int = 0, progress=None):
        self.processor = processor
        self.skipped = SkipReport()
        image_tokens = image_token_count(processor)
        rng = random.Random(seed)
        self.examples: list[Encoded] = []
        for source in sources:
            encoded = []
            records = read_records(Path(source.json))
            for record in records:
                try:
                    encoded.append(encode_record(record, Path(source.image_root), processor, max_length, image_tokens))
                except BrokenRecord as why:
                    self.skipped.add(str(why), str(record.get("id", "?")) if isinstance(record, dict) else "?")
                except AttributeError:
                    self.skipped.add("not a JSON object", "?")
                if progress:
                    progress()
            take = round(source.weight * len(encoded))
            picks = [encoded[i % len(encoded)] for i in range(take)] if encoded else []
            rng.shuffle(picks)
            self.examples += picks
        if not self.examples:
            raise MatvlmError("data: no usable record (" + "; ".join(self.skipped.lines() or ["the sources are empty"]) + ")")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict | None:
        example = self.examples[index]
        try:
            image = Image.open(example.image).convert("RGB")
        except (UnidentifiedImageError, OSError):
            return None  # counted by the collator
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return {"input_ids": example.input_ids, "labels": example.labels, "pixel_values": pixels}


def collate(batch: list[dict | None], pad_id: int) -> dict[str, torch.Tensor]:
    batch = [b for b in batch if b is not None]
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": torch.stack([b["pixel_values"] for b in batch])}
