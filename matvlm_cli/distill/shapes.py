"""The shapes of training batches (`training.shapes`), which decide how often torch.compile compiles and
how much of each step is padding.

- `padded`: each batch padded to its longest record (the default; every batch may have a new length).
- `buckets`: each batch padded to the next length of a short list, `training.buckets`.
- `packed`: whole records one after another in rows of `training.pack_length` tokens, `batch_size` rows a
  step: every step has the same shape. Rows are filled by best-fit decreasing over a window of records
  (of `WINDOW_BATCHES` steps' worth of tokens) of the epoch's shuffled order, so a row is nearly full; the
  rows a window leaves over go back to the next one. The plan is a function of (seed, epoch) alone, so a
  resumed run sees the same batches. The records of a row are kept apart by `hybrid.packed` (attention)
  and the Mamba-2 mixers (`seq_idx`); see `collate_packed` for what a packed batch holds.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..choices import Shapes, choices
from ..errors import MatvlmError
from ..hybrid.conversion import attention_windows
from .data import EpochShuffle, collate

SHAPES = choices(Shapes)
WINDOW_BATCHES = 16  # packing looks at this many steps' worth of records at a time (padding 0.6 % on the mix: docs/distill-shapes.md)


def default_buckets(model_max_length: int) -> list[int]:
    """Eighths of model_max_length, rounded up to a multiple of 8."""
    return sorted({8 * math.ceil(model_max_length * i / 64) for i in range(1, 8)} | {model_max_length})


def collate_to_bucket(batch: list[dict], pad_id: int, buckets: list[int]) -> dict:
    """`collate`, padded further to the shortest bucket that holds the batch's longest record (the recipe
    checks that the longest bucket covers model_max_length)."""
    longest = max((len(b["input_ids"]) for b in batch if "input_ids" in b), default=0)
    return collate(batch, pad_id, width=buckets[bisect.bisect_left(buckets, longest)])


def best_fit_decreasing(items: list[int], lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of at most `capacity` tokens: the longest record first, each into the row it fills best."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for item in sorted(items, key=lambda i: -int(lengths[i])):  # stable: ties keep the shuffled order
        n = int(lengths[item])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([item])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            space, row = free.pop(at)
            rows[row].append(item)
            bisect.insort(free, (space - n, row))
    return rows


class PackedBatches(Sampler):
    """A batch sampler: each batch a list of (record, row) pairs, `rows` rows of at most `row_length`
    tokens. `set_epoch` picks the epoch (accelerate calls it, on this or on `.sampler`)."""

    def __init__(self, lengths: np.ndarray, rows: int, row_length: int, seed: int, shuffle: bool = True):
        self.lengths, self.rows, self.row_length = np.asarray(lengths), rows, row_length
        self.sampler = EpochShuffle(len(self.lengths), seed)
        self.shuffle = shuffle
        self._plans: dict[int, list] = {}

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's batches, each a list of rows of record indices."""
        if epoch not in self._plans:
            self._plans = {epoch: self._pack(self.sampler.permutation_for(epoch) if self.shuffle else list(range(len(self.lengths))))}
        return self._plans[epoch]

    def _pack(self, order: list[int]) -> list[list[list[int]]]:
        window = WINDOW_BATCHES * self.rows * self.row_length
        batches, pool, pool_tokens, at = [], [], 0, 0
        while at < len(order) or pool:
            while at < len(order) and pool_tokens < window:
                pool.append(order[at])
                pool_tokens += int(self.lengths[order[at]])
                at += 1
            rows = best_fit_decreasing(pool, self.lengths, self.row_length)
            # The fullest rows make this window's batches; the others' records wait for the next window.
            rows.sort(key=lambda row: -int(self.lengths[row].sum()))
            last = at == len(order)
            kept = len(rows) if last else len(rows) // self.rows * self.rows
            batches += [rows[i : i + self.rows] for i in range(0, kept, self.rows)]
            pool = [item for row in rows[kept:] for item in row]
            pool_tokens = int(self.lengths[pool].sum()) if pool else 0
        return batches

    def __iter__(self):
        for batch in self.plan(self.sampler.epoch):
            yield [(int(item), row) for row, items in enumerate(batch) for item in items]

    def __len__(self) -> int:
        return len(self.plan(self.sampler.epoch))


class RowsOf(Dataset):
    """A dataset read by (index, row) keys: the item, marked with the row the batch sampler put it in."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, row = key
        return self.dataset[index] | {"row": row}


def collate_packed(batch: list[dict], pad_id: int, rows: int, row_length: int, longest: int | None = None) -> dict:
    """Rows of `row_length` tokens, each holding its records one after another, then padding. Besides
    input_ids and labels (a record's first token is never a target of the one before it) it holds:
    - `attention_mask`: 1 on records' tokens (the losses and the token counts read it; the model does not);
    - `position_ids`: 0, 1, ... from each record's start (and from the padding's);
    - `seq_idx`: each position's record within its row (the padding a record of its own);
    - `cu_seq_lens_q`: where records and paddings start and end over the flattened rows, the padding cut
      into pieces of at most `longest` (the longest a record can be, by default the row), and
      `max_length_q`, that bound: the varlen kernels size their grids by it;
    - `pixel_values`: the images in the order of their tokens in the flattened rows."""
    longest = min(longest or row_length, row_length)
    broken = [(b["id"], b["broken"]) for b in batch if "broken" in b]
    shape = (rows, row_length)
    ids, labels = torch.full(shape, pad_id), torch.full(shape, -100)
    mask, position_ids, seq_idx = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.int32)
    by_row: list[list[dict]] = [[] for _ in range(rows)]
    for b in batch:
        if "broken" not in b:
            by_row[b["row"]].append(b)
    if not any(by_row):
        return {"broken": broken}
    boundaries, images = [0], []
    for r, records in enumerate(by_row):
        at = 0
        for k, b in enumerate(records):
            if b.get("image_inputs") or b.get("per_token"):
                raise MatvlmError(f"data: record {b['id']}: packed rows take images of a fixed token count only")
            n = len(b["input_ids"])
            if at + n > row_length or n > longest:
                raise MatvlmError(f"data: record {b['id']} ({n} tokens) does not fit its packed row of {row_length} "
                                  f"(training.pack_length) or is longer than {longest}; its image expanded to more tokens than prepared")
            ids[r, at : at + n], labels[r, at : at + n], mask[r, at : at + n] = b["input_ids"], b["labels"], 1
            labels[r, at] = -100
            position_ids[r, at : at + n] = torch.arange(n)
            seq_idx[r, at : at + n] = k
            if "pixel_values" in b:
                images.append(b["pixel_values"])
            at += n
            boundaries.append(r * row_length + at)
        if at < row_length:
            position_ids[r, at:] = torch.arange(row_length - at)
            seq_idx[r, at:] = len(records)
            boundaries += range(r * row_length + at + longest, (r + 1) * row_length, longest)
            boundaries.append((r + 1) * row_length)
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids, "seq_idx": seq_idx,
           "cu_seq_lens_q": torch.tensor(boundaries, dtype=torch.int32), "max_length_q": longest, "broken": broken}
    if images:
        out["pixel_values"] = torch.stack(images)
    out["model_inputs"] = [key for key in out if key not in ("input_ids", "labels", "attention_mask", "broken")]
    return out


def packing_problem(family, images, text_config) -> str | None:
    """Why this model's records cannot share rows, or None. Packing keeps records apart in causal
    attention and in the Mamba-2 mixers; a bidirectional prefix, per-token image inputs, size-dependent
    image token counts or sliding windows would each need their own handling, which they do not have."""
    if family is not None and family.prefix_lm_token_types:
        return "its family reads a bidirectional prefix (token types)"
    if not images.fixed:
        return "its processor gives each image a size-dependent number of tokens or image inputs beyond pixel_values"
    if any(window is not None for window in attention_windows(text_config)):
        return "its attention has sliding windows"
    if getattr(text_config, "attention_dropout", 0.0):
        return "its attention has dropout"
    return None


def longest_record(dataset, indices: range) -> tuple[str, int]:
    """The id and length of the longest of these records."""
    lengths = dataset.lengths[indices.start : indices.stop]
    at = int(np.argmax(lengths))
    return str(dataset.record(indices.start + at)["id"]), int(lengths[at])
