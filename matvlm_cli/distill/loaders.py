"""The run's data: its sources (the recipe's, or the embedded world's), prepared into the cache, and the
training and held-out DataLoaders, batching as `training.shapes` says (shapes.py)."""

from __future__ import annotations

import functools
import json
import os

import torch
from accelerate import Accelerator
from rich.console import Console
from torch.utils.data import DataLoader, Subset

from ..atomic import write_atomic
from ..errors import MatvlmError
from ..families import model_family
from ..recipes import DataSource, DistillRecipe
from .data import ConversationDataset, EpochShuffle, LengthGroupedShuffle, collate
from .prepare import Prepared, prepare
from .shapes import (
    PackedBatches,
    RowsOf,
    collate_packed,
    collate_to_bucket,
    default_buckets,
    longest_record,
    packing_problem,
)

# Reading turns are about 3 % of the embedded world's training turns, so a short distillation sees few
# of them: six more passes over them lifted TextVQA-style from 0.68 to 0.84 after the 700 steps of
# tiny-default.yaml (three: 0.80), with nothing lost elsewhere (README, Distill).
EMBEDDED_READING_WEIGHT = 6.0


def embedded_world_sources(console: Console):
    """The embedded world's training conversations, generated once into the cache, plus their reading
    turns again at `EMBEDDED_READING_WEIGHT`."""
    from ..paths import cache_dir
    from ..world import generate_world
    from ..world.questions import reading_records
    from ..world.writers import WORLD_VERSION

    cache = cache_dir()
    train = cache / f"world-seed0-distill-v{WORLD_VERSION}" / "train"
    conversations, reading = train / "conversations.json", train / "reading.json"
    if not conversations.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with console.status(f"Generating the embedded world into {train.parent}"):
            generate_world(train.parent, seed=0, train_size=20_000, overwrite=True)
    if not reading.is_file():
        write_atomic(reading, json.dumps(reading_records(json.loads(conversations.read_text()))))
    return [
        DataSource(json=str(conversations), image_root=str(train)),
        DataSource(json=str(reading), image_root=str(train), weight=EMBEDDED_READING_WEIGHT),
    ]


def prepare_sources(recipe: DistillRecipe, processor_dir, processor, accelerator: Accelerator,
                    console: Console) -> tuple[list[DataSource], Prepared]:
    """The recipe's sources and their records prepared. The main process generates the embedded world and
    prepares the data; the others then map its cache."""
    from ..paths import cache_dir

    with accelerator.main_process_first():
        sources = recipe.data or embedded_world_sources(console)
        prepared = prepare(sources, processor_dir, processor, recipe.model_max_length, cache_dir() / "prepared",
                           skip_text_only=recipe.skip_text_only, trust_remote_code=recipe.trust_remote_code, console=console)
    return sources, prepared


def open_dataset(recipe: DistillRecipe, prepared: Prepared, sources: list[DataSource], processor, config,
                 accelerator: Accelerator, console: Console) -> ConversationDataset:
    family = model_family(config)  # the loaded config: published layouts (TinyLLaVA) are read, not auto-loaded
    dataset = ConversationDataset(prepared, sources, processor, seed=recipe.training.seed,
                                  prefix_lm_token_types=family and family.prefix_lm_token_types)
    if accelerator.is_main_process:
        where = "prepared into" if prepared.rebuilt else "read from"
        console.print(f"data: {len(dataset)} records {where} {prepared.directory}")
        for line in dataset.skipped.lines():
            console.print(f"[yellow]data:[/yellow] {line}")
    return dataset


def default_workers(processes: int, device: torch.device) -> int:
    """DataLoader workers per process. On an accelerator: the cores left after one per process, at most
    8 (image decoding and the processor's resize then run beside the step). On a CPU the step already
    uses every core: a worker only competes with it (the embedded recipe, 100 steps on 2 cores: 60 s
    without a worker, 62 s with one)."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // processes - 1))


def build_loaders(recipe: DistillRecipe, dataset: ConversationDataset, config, pad: int,
                  accelerator: Accelerator) -> tuple[DataLoader, DataLoader | None]:
    """The training loader and, when the run evaluates, the loader of the held-out records (the first
    `output.eval_samples`). `config`: the model's, `pad`: the tokenizer's padding id."""
    r, t = recipe, recipe.training
    held_out = r.output.eval_samples if r.output.eval_every else 0
    if held_out >= len(dataset):
        raise MatvlmError(f"output.eval_samples: {held_out} would hold out all {len(dataset)} usable records")
    workers = t.num_workers if t.num_workers is not None else default_workers(accelerator.num_processes, accelerator.device)
    # Images are decoded in the workers, a few batches ahead of the step.
    loading = {"num_workers": workers, "persistent_workers": workers > 0, "prefetch_factor": 4 if workers else None}
    train_set, eval_set = Subset(dataset, range(held_out, len(dataset))), Subset(dataset, range(held_out))
    lengths = dataset.lengths
    if t.shapes == "packed":
        why = packing_problem(model_family(config), dataset.reader.images, config.get_text_config(decoder=True))
        if why:
            raise MatvlmError(f"training.shapes: packed: this teacher's records cannot share rows ({why}); use buckets")
        row_length = t.pack_length or r.model_max_length
        record, longest = longest_record(dataset, range(len(dataset)))
        if longest > row_length:
            raise MatvlmError(f"training.pack_length: {row_length} tokens is shorter than record {record} ({longest} tokens, "
                              f"the longest); set it to at least {longest}, or to null for model_max_length")
        collate_rows = functools.partial(collate_packed, pad_id=pad, rows=t.batch_size, row_length=row_length, longest=r.model_max_length)
        loader = DataLoader(RowsOf(train_set), batch_sampler=PackedBatches(lengths[held_out:], t.batch_size, row_length, t.seed),
                            collate_fn=collate_rows, **loading)
        eval_batches = PackedBatches(lengths[:held_out], t.batch_size, row_length, t.seed, shuffle=False)
        return loader, DataLoader(RowsOf(eval_set), batch_sampler=eval_batches, collate_fn=collate_rows) if held_out else None
    if t.shapes == "buckets":
        collate_fn = functools.partial(collate_to_bucket, pad_id=pad, buckets=t.buckets or default_buckets(r.model_max_length))
    else:
        collate_fn = functools.partial(collate, pad_id=pad)
    if t.group_by_length:
        sampler = LengthGroupedShuffle(lengths[held_out:], t.seed, t.batch_size)
    else:
        sampler = EpochShuffle(len(train_set), t.seed)
    loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, collate_fn=collate_fn, **loading)
    return loader, DataLoader(eval_set, batch_size=t.batch_size, collate_fn=collate_fn) if held_out else None
