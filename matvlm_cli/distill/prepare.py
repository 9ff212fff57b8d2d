"""Preparing the data once: every record tokenised in parallel over the machine's cores (in the calling
process when all of it fits one task) into Arrow files in the cache, keyed by the data files, the
processor and model_max_length, and memory-mapped by every process and every later run. The cache stores
each record with one placeholder token per image; the expansion into the processor's own image tokens
(their number may depend on the image's size) happens when a record is read, so the cache stays small
and images are never opened here. `length` counts each image at a 32x32 probe's expansion: exact for
fixed-count processors, an estimate for the others, whose records are checked against model_max_length
again once expanded.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from .records import BrokenRecord, RecordEncoder, SkipReport, image_token_count, iter_json_list

# Bump when what a prepared cache holds changes, so old caches are rebuilt rather than misread.
PREPARED_VERSION = 3  # 2: the placeholder is the processor's own (image_token), meta.json holds max_length; 3: turns alternate
RECORDS_PER_TASK = 512
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.string()),  # relative to the source's image_root; null for a text-only record
    ("input_ids", pa.list_(pa.int32())),  # one image token per image
    ("label_spans", pa.list_(pa.int32())),  # [start, end) token ranges of the assistant turns, flattened
    ("length", pa.int32()),  # tokens once the image is expanded (at a 32x32 probe's count: see above)
])


_worker: RecordEncoder | None = None


def _encoder(processor_dir: str, max_length: int, image_tokens: int, skip_text_only: bool, trust_remote_code: bool) -> RecordEncoder:
    # From the processor's folder, in a worker and in the calling process alike: the same records either way.
    from ..hybrid.processors import load_processor

    return RecordEncoder(load_processor(processor_dir, trust_remote_code), max_length, image_tokens, skip_text_only)


def _start_worker(*encoder_args) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    torch.set_num_threads(1)
    _worker = _encoder(*encoder_args)


def _encode_task(task: tuple[str, list]) -> tuple[pa.RecordBatch, SkipReport]:
    return _encode_records(_worker, *task)


def _fits_one_task(sources) -> bool:
    """Whether all the sources together hold at most one task's records (reading at most one more)."""
    seen = 0
    for source in sources:
        for _ in iter_json_list(Path(source.json)):
            seen += 1
            if seen > RECORDS_PER_TASK:
                return False
    return True


class _InProcessPool:
    """A pool's `imap` in the calling process, for data that fits one task."""

    def __init__(self, encoder: RecordEncoder):
        self.encoder = encoder

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap(self, _, tasks):
        return (_encode_records(self.encoder, *task) for task in tasks)


def _encode_records(encoder: RecordEncoder, image_root: str, records: list) -> tuple[pa.RecordBatch, SkipReport]:
    rows = {name: [] for name in SCHEMA.names}
    skipped = SkipReport()
    for record in records:
        record_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
        try:
            encoded = encoder.encode(record, Path(image_root))
        except BrokenRecord as why:
            skipped.add(str(why), record_id)
            continue
        rows["id"].append(record_id)
        for key, value in encoded.items():
            rows[key].append(value)
    return pa.RecordBatch.from_pydict(rows, schema=SCHEMA), skipped


def _chunks(iterator, size: int):
    chunk = []
    for item in iterator:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(sources, processor_dir: Path, max_length: int, image_tokens: int, skip_text_only: bool) -> str:
    """Everything a prepared record depends on: the data files (path, size, modification time), every
    processor file (by content), model_max_length and the preparation code's version."""
    processor_files = sorted(
        p for p in Path(processor_dir).iterdir()
        if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt", ".pth") and not p.name.endswith(".index.json")
    )
    digest = hashlib.sha256()
    for p in processor_files:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    description = {
        "version": PREPARED_VERSION,
        "sources": [_file_identity(Path(s.json)) + [str(Path(s.image_root).resolve())] for s in sources],
        "processor": digest.hexdigest(), "max_length": max_length, "image_tokens": image_tokens,
        "skip_text_only": skip_text_only,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Prepared:
    """A prepared cache: one Arrow file per source, plus what was skipped."""

    directory: Path
    skipped: SkipReport
    rebuilt: bool

    def table(self, index: int) -> pa.Table:
        return pa.ipc.open_file(pa.memory_map(str(self.directory / f"source-{index}.arrow"))).read_all()


def prepare(sources, processor_dir: Path, processor, max_length: int, cache_root: Path, skip_text_only: bool = False,
            trust_remote_code: bool = False, workers: int | None = None, console=None) -> Prepared:
    """Tokenise every source once into `cache_root/<key>`, or reuse what an earlier run prepared."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from ..atomic import atomic_directory

    image_tokens = image_token_count(processor)
    key = cache_key(sources, processor_dir, max_length, image_tokens, skip_text_only)
    target = cache_root / key
    if (target / "meta.json").is_file():
        return Prepared(target, SkipReport.from_json(json.loads((target / "meta.json").read_text())["skipped"]), False)
    workers = workers or len(os.sched_getaffinity(0))
    skipped = SkipReport()
    encoder_args = (str(processor_dir), max_length, image_tokens, skip_text_only, trust_remote_code)
    if _fits_one_task(sources):  # one task: a pool's start (seconds of imports per worker) would cost more than it saves
        pool = _InProcessPool(_encoder(*encoder_args))
    else:
        context = multiprocessing.get_context("spawn")  # the trainer's torch threads make fork unsafe
        pool = context.Pool(workers, _start_worker, encoder_args)
    # one line per source file, sized for an 80-column terminal with a file name of 20 characters or so
    progress = Progress(TextColumn("[bold]preparing[/bold] {task.description}"), BarColumn(bar_width=12), DownloadColumn(),
                        TextColumn("{task.fields[records]} records"), TimeRemainingColumn(), console=console)
    cache_root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, overwrite=True) as tmp, progress, pool as pool:
        counts = []
        for index, source in enumerate(sources):
            path = Path(source.json)
            task = progress.add_task(path.name, total=path.stat().st_size, records=0)
            records = iter_json_list(path, on_bytes=lambda n, task=task: progress.update(task, completed=n))
            tasks = ((str(source.image_root), chunk) for chunk in _chunks(records, RECORDS_PER_TASK))
            kept = 0
            with pa.OSFile(str(tmp / f"source-{index}.arrow"), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
                for batch, skips in pool.imap(_encode_task, tasks):  # in order: the cache is the same for any pool size
                    writer.write_batch(batch)
                    skipped.merge(skips)
                    kept += batch.num_rows
                    progress.update(task, records=kept)
            counts.append(kept)
        meta = {"key": key, "records": counts, "skipped": skipped.to_json(), "image_tokens": image_tokens, "max_length": max_length,
                "sources": [s.json for s in sources]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return Prepared(target, skipped, True)
