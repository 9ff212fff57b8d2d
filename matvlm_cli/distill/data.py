"""LLaVA-format conversation data (LLaVA-1.5 mix665k, ShareGPT4V) for distillation.

Each record is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}...]}`; a record
with an image holds `<image>` in its first human turn, a text-only record has neither (LLaVA trains on
both). Text goes through the processor's own chat template and labels keep only the assistant turns.

Records are prepared once (`prepare`): tokenised in parallel over the machine's cores into Arrow files
in the cache, keyed by the data files, the processor and model_max_length, and memory-mapped by every
process and every later run. The cache stores each record with one image token per image; the
expansion to the model's image-token count happens when a record is read, so the cache stays small.
Broken records are skipped, counted and reported by id, never silently; so are images that turn out to
be unreadable when a batch is built.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..errors import MatvlmError
from ..images import ImageError, open_rgb

IMAGE_TAG = "<image>"
# Bump when what a prepared cache holds changes, so old caches are rebuilt rather than misread.
PREPARED_VERSION = 1
RECORDS_PER_TASK = 512
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.string()),  # relative to the source's image_root; null for a text-only record
    ("input_ids", pa.list_(pa.int32())),  # one image token per image
    ("label_spans", pa.list_(pa.int32())),  # [start, end) token ranges of the assistant turns, flattened
    ("length", pa.int32()),  # tokens once the image is expanded
])


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
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
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
        render = lambda m, prompt=False: self.processor.apply_chat_template(m, add_generation_prompt=prompt)  # noqa: E731
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
            raise BrokenRecord(f"the template gave {n_images} image tokens for one image")
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


def image_token_count(processor) -> int:
    probe = processor(images=[Image.new("RGB", (32, 32))], text=[IMAGE_TAG], return_tensors="pt")
    return int((probe["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TAG)).sum())


# -- preparation ---------------------------------------------------------------------------------

_worker: RecordEncoder | None = None


def _start_worker(processor_dir: str, max_length: int, image_tokens: int, skip_text_only: bool, trust_remote_code: bool) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    torch.set_num_threads(1)
    from ..hybrid.io import load_processor

    _worker = RecordEncoder(load_processor(processor_dir, trust_remote_code), max_length, image_tokens, skip_text_only)


def _encode_task(task: tuple[str, list]) -> tuple[pa.RecordBatch, SkipReport]:
    image_root, records = task
    rows = {name: [] for name in SCHEMA.names}
    skipped = SkipReport()
    for record in records:
        record_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
        try:
            encoded = _worker.encode(record, Path(image_root))
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

    from ..hybrid.io import atomic_directory

    image_tokens = image_token_count(processor)
    key = cache_key(sources, processor_dir, max_length, image_tokens, skip_text_only)
    target = cache_root / key
    if (target / "meta.json").is_file():
        return Prepared(target, SkipReport.from_json(json.loads((target / "meta.json").read_text())["skipped"]), False)
    workers = workers or len(os.sched_getaffinity(0))
    skipped = SkipReport()
    context = multiprocessing.get_context("spawn")  # the trainer's torch threads make fork unsafe
    progress = Progress(TextColumn("[bold]preparing data[/bold] {task.description}"), BarColumn(), DownloadColumn(),
                        TextColumn("{task.fields[records]} records"), TimeRemainingColumn(), console=console)
    cache_root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, overwrite=True) as tmp, progress, context.Pool(
        workers, _start_worker, (str(processor_dir), max_length, image_tokens, skip_text_only, trust_remote_code)
    ) as pool:
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
        meta = {"key": key, "records": counts, "skipped": skipped.to_json(), "image_tokens": image_tokens,
                "sources": [s.json for s in sources]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return Prepared(target, skipped, True)


# -- reading prepared records --------------------------------------------------------------------

class ConversationDataset(Dataset):
    """A weighted mix of prepared sources, read from memory-mapped Arrow tables."""

    def __init__(self, prepared: Prepared, sources, processor, seed: int = 0):
        self.processor = processor
        self.skipped = prepared.skipped
        self.image_tokens = json.loads((prepared.directory / "meta.json").read_text())["image_tokens"]
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
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
        record = self.record(index)
        ids = record["input_ids"]
        labels = np.full(len(ids), -100, dtype=np.int64)
        for start, end in record["label_spans"]:
            labels[start:end] = ids[start:end]
        item = {"id": record["id"]}
        if record["image"] is not None:
            repeats = np.where(ids == self.image_token_id, self.image_tokens, 1)
            ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
            try:
                image = open_rgb(self.sources[self.which[index]].image_root / record["image"])
            except ImageError as err:  # counted by the trainer, by id, like every other broken record
                return item | {"broken": f"unreadable image ({err.reason})"}
            item["pixel_values"] = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return item | {"input_ids": torch.from_numpy(ids.astype(np.int64)), "labels": torch.from_numpy(labels)}


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


def collate(batch: list[dict], pad_id: int) -> dict:
    """Pads to the batch's longest record; records whose image could not be read travel as `broken`
    (id, reason) for the trainer to count."""
    broken = [(b["id"], b["broken"]) for b in batch if "broken" in b]
    batch = [b for b in batch if "broken" not in b]
    if not batch:
        return {"broken": broken}
    width = max(len(b["input_ids"]) for b in batch)
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
    return out


class EpochShuffle(Sampler):
    """A fresh permutation per epoch from (seed, epoch): reproducible, and resumable mid-epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)).tolist()

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
