"""Benchmark data for `matvlm evaluate`: find a benchmark on disk, check it, hand lm-eval a DatasetDict.

Layout of `--data-dir DIR` (only the benchmarks being evaluated need to be there):

    DIR/pope/      lmms-lab/POPE      split test        columns question_id, question, answer, image, category
    DIR/mmmu/      lmms-lab/MMMU      split validation  columns id, question, options, answer, question_type,
                                                        image_1 (image_2 ... image_7 when referred to)
    DIR/textvqa/   lmms-lab/textvqa   split validation  columns question_id, question, image, answers
                                                        (ocr_tokens with --ocr)

Each folder is either the hub's parquet files (`data/<split>-*.parquet` or `<split>-*.parquet`; files not
named after another split are read too, so a single `pope.parquet` works) or a folder written by
`datasets`' `save_to_disk` (a DatasetDict with that split, or a single Dataset). Everything is read from
disk: nothing is downloaded.

The checks run before any model is loaded, so a wrong column costs seconds, not a model load; their
errors name the file and the column. Without --data-dir the embedded synthetic world's sets are written
once into a cache folder (same schemas, see matvlm_cli.world.writers) and used instead.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ..errors import MatvlmError
from ..images import open_rgb

TEXT, ID, IMAGE, TEXTS = "strings", "strings or integers", "images", "lists of strings"  # column kinds
KNOWN_SPLITS = ("train", "validation", "dev", "test")
SYNTHETIC_SEED = 0


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives under --data-dir and what its rows must hold."""

    folder: str
    split: str
    columns: dict[str, str]  # required column -> kind (TEXT, ID, IMAGE, TEXTS)
    optional: dict[str, str] = field(default_factory=dict)  # checked when present, or when a task asks for it
    nullable: frozenset[str] = frozenset()  # required columns that may have empty cells
    closed_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # compared case-insensitively
    nonempty_lists: frozenset[str] = frozenset()  # list columns where an empty list cannot be scored
    literal_lists: frozenset[str] = frozenset()  # string columns holding a Python list of strings, as written


BENCHMARKS = {
    "pope": Benchmark(
        "pope", "test",
        {"question_id": ID, "question": TEXT, "answer": TEXT, "image": IMAGE, "category": TEXT},
        closed_values={"answer": ("yes", "no")},
    ),
    "mmmu": Benchmark(
        "mmmu", "validation",
        {"id": TEXT, "question": TEXT, "options": TEXT, "answer": TEXT, "question_type": TEXT, "image_1": IMAGE},
        optional={f"image_{k}": IMAGE for k in range(2, 8)},
        nullable=frozenset({"image_1"}),  # a question uses only the images its text refers to
        closed_values={"question_type": ("multiple-choice", "open")},
        literal_lists=frozenset({"options"}),
    ),
    "textvqa": Benchmark(
        "textvqa", "validation",
        {"question_id": ID, "question": TEXT, "image": IMAGE, "answers": TEXTS},
        optional={"ocr_tokens": TEXTS},
        nonempty_lists=frozenset({"answers"}),  # VQA accuracy against no answers would be 0, silently
    ),
}


def synthetic_data_dir() -> Path:
    """The embedded world's benchmark sets (seed 0, the sets the teacher's numbers are measured on),
    written on first use. `generate_world` writes atomically, so a concurrent first run either finds
    the finished folder or loses the rename race and uses the winner's."""
    from ..paths import cache_dir
    from ..world import generate_world

    root = cache_dir() / f"world-seed{SYNTHETIC_SEED}"
    if not (root / "world.json").is_file():
        try:
            generate_world(root, seed=SYNTHETIC_SEED, train_size=1)
        except (OSError, MatvlmError):  # a write that lost the rename race to a concurrent one
            if not (root / "world.json").is_file():
                raise
    return root


def _kind_ok(arrow_type: pa.DataType, kind: str) -> bool:
    if kind == TEXT:
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if kind == ID:
        return _kind_ok(arrow_type, TEXT) or pa.types.is_integer(arrow_type)
    if kind == TEXTS:
        return (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and _kind_ok(arrow_type.value_type, TEXT)
    if kind == IMAGE:  # the hub's struct<bytes, path>, or plain encoded bytes
        if pa.types.is_struct(arrow_type):
            return arrow_type.get_field_index("bytes") >= 0
        return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
    raise ValueError(f"unknown column kind {kind!r}")


def check_table(table: pa.Table, benchmark: Benchmark, source: str, extra_columns: tuple[str, ...] = ()) -> None:
    """Raise a MatvlmError naming `source` and the first bad column: missing, of the wrong type, with
    empty cells, or with a value outside its closed set."""
    required = {**benchmark.columns, **{name: benchmark.optional[name] for name in extra_columns}}
    names = set(table.schema.names)
    missing = [name for name in required if name not in names]
    if missing:
        raise MatvlmError(
            f"{source}: column '{missing[0]}' is missing ({benchmark.folder} needs {', '.join(required)}; "
            f"found {', '.join(table.schema.names) or 'none'})"
        )
    for name, kind in {**benchmark.optional, **required}.items():
        if name in names and not _kind_ok(table.schema.field(name).type, kind):
            raise MatvlmError(f"{source}: column '{name}' must hold {kind}, found {table.schema.field(name).type}")
    for name in required:
        column = table.column(name)
        if name not in benchmark.nullable and column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise MatvlmError(f"{source}: column '{name}' is empty in {column.null_count} rows (first: row {first})")
    for name in benchmark.nonempty_lists:
        empty = pc.equal(pc.list_value_length(table.column(name)), 0)
        if pc.any(empty).as_py():
            raise MatvlmError(f"{source}: column '{name}' is an empty list in row {pc.index(empty, True).as_py()}; it needs at least one")
    for name in benchmark.literal_lists:
        for row, text in enumerate(table.column(name).to_pylist()):
            if text is not None and not _is_string_list(text):
                raise MatvlmError(f"{source}: column '{name}' must hold a list of strings written as ['a', 'b']; row {row} has {text[:80]!r}")
    for name, allowed in benchmark.closed_values.items():
        values = pc.utf8_lower(pc.utf8_trim_whitespace(table.column(name)))
        outside = pc.invert(pc.is_in(values, value_set=pa.array(allowed)))
        if pc.any(outside).as_py():
            row = pc.index(outside, True).as_py()
            raise MatvlmError(
                f"{source}: column '{name}' must be one of {', '.join(allowed)}; row {row} has {table.column(name)[row].as_py()!r}"
            )


def _is_string_list(text: str) -> bool:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _split_files(folder: Path, split: str) -> list[Path]:
    """The parquet files of `split`: those named after it, else all those not named after another split."""
    files = sorted(folder.glob("data/*.parquet")) or sorted(folder.glob("*.parquet"))
    named = [f for f in files if re.match(rf"{re.escape(split)}[-_.]", f.name)]
    if named:
        return named
    others = [s for s in KNOWN_SPLITS if s != split]
    return [f for f in files if not re.match(rf"({'|'.join(others)})[-_.]", f.name)]


def _read_parquet(files: list[Path], benchmark: Benchmark, extra_columns: tuple[str, ...]):
    import datasets

    tables = []
    for path in files:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise MatvlmError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
        check_table(table, benchmark, str(path), extra_columns)
        tables.append(table)
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as err:
        raise MatvlmError(f"{files[0].parent}: the parquet files do not share one schema ({err})") from None
    return datasets.Dataset(table)


def _read_saved(folder: Path, benchmark: Benchmark, extra_columns: tuple[str, ...]):
    """A `save_to_disk` folder: the split of a DatasetDict (or, as for parquet files, every split not
    named after another one), or a single Dataset."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as err:
        raise MatvlmError(f"{folder}: cannot be read as a datasets save_to_disk folder ({str(err).splitlines()[0]})") from None
    source = str(folder)
    if isinstance(saved, datasets.DatasetDict):
        others = [s for s in KNOWN_SPLITS if s != benchmark.split]
        splits = [benchmark.split] if benchmark.split in saved else [s for s in saved if s not in others]
        if not splits:
            raise MatvlmError(f"{folder}: no split '{benchmark.split}' (found {', '.join(saved)})")
        for split in splits:
            check_table(saved[split].data.table, benchmark, f"{folder}/{split}", extra_columns)
        return datasets.concatenate_datasets([saved[s] for s in splits])
    check_table(saved.data.table, benchmark, source, extra_columns)
    return saved


@functools.lru_cache(maxsize=8)
def _load(benchmark_name: str, data_root: str, extra_columns: tuple[str, ...]):
    import datasets

    benchmark = BENCHMARKS[benchmark_name]
    folder = Path(data_root) / benchmark.folder
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        dataset = _read_saved(folder, benchmark, extra_columns)
    else:
        files = _split_files(folder, benchmark.split) if folder.is_dir() else []
        if not files:
            raise MatvlmError(
                f"{folder}: no {benchmark_name} data (expected {folder}/data/{benchmark.split}-*.parquet, "
                f"{folder}/*.parquet or a datasets save_to_disk folder)"
            )
        dataset = _read_parquet(files, benchmark, extra_columns)
    for name, kind in {**benchmark.columns, **benchmark.optional}.items():
        if kind == IMAGE and name in dataset.column_names:
            # Documents carry the encoded {bytes, path}: `to_rgb` decodes them and names the row when one is
            # broken, where `datasets`' own decoding would fail inside lm-eval naming nothing.
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return datasets.DatasetDict({benchmark.split: dataset})


def load_benchmark(benchmark: str, data_root: str | os.PathLike | None = None, extra_columns=()):
    """The benchmark's split as a DatasetDict, checked; `data_root` None means the synthetic sets.

    Cached per process, so the engine's early check and lm-eval's `custom_dataset` call read it once."""
    if benchmark not in BENCHMARKS:
        raise MatvlmError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    root = Path(data_root) if data_root is not None else synthetic_data_dir()
    return _load(benchmark, str(root.resolve()), tuple(extra_columns))


def to_rgb(value, where: str) -> Image.Image:
    """A PIL RGB image from what a dataset row holds: {bytes, path}, raw bytes, a path or a decoded image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if not isinstance(value, (bytes, bytearray, str)):
        raise MatvlmError(f"{where}: not an image ({type(value).__name__})")
    return open_rgb(value, where)
