"""The prepared records as a torch Dataset (weighted mix of sources), the collator and the samplers.

Images are decoded here, in the DataLoader's workers; one that fails is passed on as `broken` for the
trainer to count and report by id.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import MatvlmError
from ..images import ImageError, open_rgb
from .prepare import Prepared
from .records import ImageInputs


class ConversationDataset(Dataset):
    """A weighted mix of prepared sources, read from memory-mapped Arrow tables."""

    def __init__(self, prepared: Prepared, sources, processor, seed: int = 0, prefix_lm_token_types: str | None = None):
        self.processor = processor
        self.skipped = prepared.skipped
        meta = json.loads((prepared.directory / "meta.json").read_text())
        self.reader = RecordReader(processor, meta["image_tokens"], meta.get("max_length"), prefix_lm_token_types)
        self.sources = [_MappedSource(prepared.table(i), Path(s.image_root)) for i, s in enumerate(sources)]
        rng = random.Random(seed)
        which, rows = [], []
        for index, (spec, source) in enumerate(zip(sources, self.sources)):
            n = source.num_rows
            picks = [i % n for i in range(round(spec.weight * n))] if n else []
            rng.shuffle(picks)
            which += [index] * len(picks)
            rows += picks
        if not rows:
            raise MatvlmError("data: no usable record (" + "; ".join(self.skipped.lines() or ["the sources are empty"]) + ")")
        self.which, self.rows = np.asarray(which, dtype=np.int64), np.asarray(rows, dtype=np.int64)
        self.lengths = np.zeros(len(rows), dtype=np.int64)
        for index, source in enumerate(self.sources):
            mine = self.which == index
            self.lengths[mine] = source.lengths[self.rows[mine]]

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, index: int) -> dict:
        """The stored form of one record (one image token per image; spans in those positions)."""
        return self.sources[self.which[index]].row(int(self.rows[index]))

    def __getitem__(self, index: int) -> dict:
        return self.reader.read(self.record(index), self.sources[self.which[index]].image_root)


class RecordReader:
    """A prepared record as the model reads it: labels from its spans, its image opened and expanded, and
    for a prefix LM (`ModelFamily.prefix_lm_token_types`) its token types: 0 up to the first answer, 1 after."""

    def __init__(self, processor, image_tokens: int, max_length: int | None = None, prefix_lm_token_types: str | None = None):
        self.processor, self.image_tokens, self.max_length = processor, image_tokens, max_length
        self.prefix_lm_token_types = prefix_lm_token_types
        self.images = ImageInputs(processor)
        self.image_token_id = self.images.placeholder_id

    def read(self, record: dict, image_root: Path) -> dict:
        ids = record["input_ids"]
        labels = np.full(len(ids), -100, dtype=np.int64)
        for start, end in record["label_spans"]:
            labels[start:end] = ids[start:end]
        item = {"id": record["id"]}
        if record["image"] is not None:
            try:
                image = open_rgb(image_root / record["image"])
            except ImageError as err:  # counted by the trainer, by id, like every other broken record
                return item | {"broken": f"unreadable image ({err.reason})"}
            if self.images.fixed:  # the same run of image tokens at any size: repeat the placeholder
                repeats = np.where(ids == self.image_token_id, self.image_tokens, 1)
                ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
                item["pixel_values"] = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
            else:
                try:
                    ids, labels, per_token, tensors = self._expand(ids, labels, image)
                except Exception as err:  # a processor that refuses this image (too small, odd mode...)
                    return item | {"broken": f"the processor failed on its image ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"}
                if self.max_length and len(ids) > self.max_length:
                    return item | {"broken": f"longer than model_max_length ({self.max_length} tokens) once its image is expanded"}
                item |= {"per_token": per_token, "image_inputs": tensors}
        if self.prefix_lm_token_types:
            answers = np.flatnonzero(labels != -100)
            suffix = np.zeros(len(ids), dtype=np.int64)
            suffix[answers[0] if len(answers) else len(ids) :] = 1
            item["per_token"] = item.get("per_token", {}) | {self.prefix_lm_token_types: torch.from_numpy(suffix)}
        return item | {"input_ids": torch.from_numpy(ids.astype(np.int64)), "labels": torch.from_numpy(labels)}

    def _expand(self, ids: np.ndarray, labels: np.ndarray, image) -> tuple:
        """The record's one placeholder token replaced by the processor's expansion for this image; labels
        there are ignored, and the assistant spans after it shift by the expansion's length."""
        at = int(np.flatnonzero(ids == self.image_token_id)[0])
        expansion, per_token, tensors = self.images.expand(image)
        ids = np.concatenate([ids[:at], expansion, ids[at + 1 :]])
        labels = np.concatenate([labels[:at], np.full(len(expansion), -100, dtype=labels.dtype), labels[at + 1 :]])
        spliced = {}
        for key, values in per_token.items():  # token types: 0 outside the image, the processor's own inside it
            row = np.zeros(len(ids), dtype=np.int64)
            row[at : at + len(expansion)] = values
            spliced[key] = torch.from_numpy(row)
        return ids, labels, spliced, tensors


class _MappedSource:
    """Row access into one memory-mapped prepared table without combining its chunks (which would copy
    the whole table into memory)."""

    def __init__(self, table: pa.Table, image_root: Path):
        self.table, self.image_root, self.num_rows = table, image_root, table.num_rows
        self.lengths = table.column("length").to_numpy()
        self.chunk_starts = np.cumsum([0] + [len(c) for c in table.column("id").chunks])
        self.chunks = {name: table.column(name).chunks for name in ("id", "image", "input_ids", "label_spans")}

    def row(self, row: int) -> dict:
        chunk = int(np.searchsorted(self.chunk_starts, row, side="right")) - 1
        at = row - int(self.chunk_starts[chunk])
        column = lambda name: self.chunks[name][chunk][at]  # noqa: E731
        return {
            "id": column("id").as_py(), "image": column("image").as_py(),
            "input_ids": column("input_ids").values.to_numpy(),
            "label_spans": column("label_spans").values.to_numpy().reshape(-1, 2),
        }


def collate(batch: list[dict], pad_id: int, width: int = 0) -> dict:
    """Pads to the batch's longest record (or to `width`, if longer); records whose image could not be
    read travel as `broken` (id, reason) for the trainer to count."""
    broken = [(b["id"], b["broken"]) for b in batch if "broken" in b]
    batch = [b for b in batch if "broken" not in b]
    if not batch:
        return {"broken": broken}
    width = max(width, *(len(b["input_ids"]) for b in batch))
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = b["input_ids"], b["labels"], 1
    images = [b["pixel_values"] for b in batch if "pixel_values" in b]
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "broken": broken}
    if images:  # text-only rows carry no image tokens, so they need no pixels
        out["pixel_values"] = torch.stack(images)
    inputs = [b["image_inputs"] for b in batch if "image_inputs" in b]
    if inputs:
        out |= {key: _concatenate([i[key] for i in inputs]) for key in inputs[0]}
    for key in {key for b in batch for key in b.get("per_token", {})}:
        column = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            if key in b.get("per_token", {}):
                column[row, : len(b["input_ids"])] = b["per_token"][key]
        out[key] = column
    # What the model's forward takes beyond input_ids.
    out["model_inputs"] = [key for key in out if key not in ("input_ids", "labels", "broken")]
    return out


def _concatenate(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One image tensor for the batch from each image's: joined along the first dimension, as the processor
    joins a batch's images (Qwen-VL's patches and grids, Gemma 3's and InternVL's crops, LLaVA-NeXT's and
    Idefics3's per-image stacks), after zero-padding the other dimensions to the largest (Idefics3's and
    LLaVA-NeXT's crop counts, Pixtral's sizes), which is how the processors pad a batch themselves."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            pad = torch.zeros((t.shape[0], *shape), dtype=t.dtype)
            pad[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
            t = pad
        padded.append(t)
    return torch.cat(padded)


class EpochShuffle(Sampler):
    """A fresh permutation per epoch from (seed, epoch): reproducible, and resumable mid-epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> list[int]:
        return self.permutation_for(self.epoch)

    def permutation_for(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 10_007 + epoch)).tolist()

    def __iter__(self):
        return iter(self.permutation())

    def __len__(self) -> int:
        return self.size


class LengthGroupedShuffle(EpochShuffle):
    """Batches of similar length, in a random order (transformers' LengthGroupedSampler): each epoch's
    permutation is cut into megabatches of 50 batches, each sorted by length, so a batch pads to a
    near neighbour rather than to the longest record of a random draw. Still a function of (seed, epoch)
    only, so resume stays exact."""

    MEGABATCH = 50

    def __init__(self, lengths: np.ndarray, seed: int, batch_size: int):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = np.asarray(lengths), batch_size

    def __iter__(self):
        order = np.asarray(self.permutation())
        mega = self.MEGABATCH * self.batch_size
        batches = []
        for start in range(0, len(order), mega):
            group = order[start : start + mega]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        # Full batches in a random order; a short last batch stays last, or every later batch would shift.
        full = len(order) // self.batch_size
        shuffled = torch.randperm(full, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch + 1)).tolist()
        return iter([int(i) for b in shuffled + list(range(full, len(batches))) for i in batches[b]])
