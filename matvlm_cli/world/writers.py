"""Write the synthetic world to disk: LLaVA-format training data and POPE / MMMU / TextVQA benchmark sets
in the Hugging Face parquet schemas of `lmms-lab/POPE`, `lmms-lab/MMMU` and `lmms-lab/textvqa`.

Layout written by `generate_world(output_dir)`:

    output_dir/
      world.json                                       the arguments that produced this folder
      .matvlm-output.json                              matvlm's output mark (`atomic.py`)
      train/conversations.json                         LLaVA list; each "image" is relative to train/
      train/images/000000.png ...
      pope/data/test-00000-of-00001.parquet            split "test", columns of POPE_SCHEMA
      mmmu/data/validation-00000-of-00001.parquet      split "validation", columns of MMMU_SCHEMA
      textvqa/data/validation-00000-of-00001.parquet   split "validation", columns of TEXTVQA_SCHEMA

The files follow the hub's `data/{split}-{shard:05d}-of-{shards:05d}.parquet` naming, so
`datasets.load_dataset("output_dir/pope")` finds the split, and each carries the `huggingface` schema
metadata with which `datasets` decodes the struct<bytes: binary, path: string> columns as PNG images.

Every part comes from its own seed stream. Benchmark scenes are drawn first and training rejects any
scene equal to one of them, so no benchmark image appears in training.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_directory
from .questions import (
    NEGATIVE_STRATEGIES,
    SUBFIELDS,
    SUBJECTS,
    choice_options,
    existence_question,
    reference_answers,
    sample_negative,
    subject_question,
    textvqa_question,
    training_conversation,
)
from .scenes import Scene, png_bytes, render, sample_scene

# Bumped whenever the same seed would write different data (v2: the training mix weighs multiple choice
# most); caches of generated worlds are keyed by it.
WORLD_VERSION = 3  # 3: training-only "binding" negatives in existence questions
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_TEXT = pa.string()
_TEXTS = pa.list_(pa.string())
POPE_SCHEMA = pa.schema([
    ("id", _TEXT), ("question_id", _TEXT), ("question", _TEXT), ("answer", _TEXT), ("image_source", _TEXT),
    ("image", IMAGE_TYPE), ("category", _TEXT),
])
MMMU_SCHEMA = pa.schema([
    ("id", _TEXT), ("question", _TEXT), ("options", _TEXT), ("explanation", _TEXT),
    *[(f"image_{k}", IMAGE_TYPE) for k in range(1, 8)],
    ("img_type", _TEXT), ("answer", _TEXT), ("topic_difficulty", _TEXT), ("question_type", _TEXT), ("subfield", _TEXT),
])
TEXTVQA_SCHEMA = pa.schema([
    ("image_id", _TEXT), ("question_id", pa.int32()), ("question", _TEXT), ("question_tokens", _TEXTS),
    ("image", IMAGE_TYPE), ("image_width", pa.int32()), ("image_height", pa.int32()),
    ("flickr_original_url", _TEXT), ("flickr_300k_url", _TEXT), ("answers", _TEXTS), ("image_classes", _TEXTS),
    ("set_name", _TEXT), ("ocr_tokens", _TEXTS),
])
BENCHMARK_FILES = {
    "pope": "pope/data/test-00000-of-00001.parquet",
    "mmmu": "mmmu/data/validation-00000-of-00001.parquet",
    "textvqa": "textvqa/data/validation-00000-of-00001.parquet",
}
OPEN_FRACTION = 0.2
DIFFICULTY = {1: "Easy", 2: "Easy", 3: "Medium", 4: "Hard"}

Rows = list[tuple[dict, Scene]]  # benchmark rows, each with the scene it shows
ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    train_json: Path
    train_images: Path
    pope: Path
    mmmu: Path
    textvqa: Path


def _stream(seed: int, name: str) -> random.Random:
    """An independent generator per part of the world, so parts neither share scenes nor shift each other."""
    return random.Random(f"matvlm-world/{seed}/{name}")


def _image(scene: Scene, image_size: int, path: str) -> dict:
    return {"bytes": png_bytes(render(scene, image_size)), "path": path}


def pope_rows(seed: int, per_category: int, image_size: int = 64) -> Rows:
    """POPE: the same images in each category, each asked once about a present kind ("yes") and once
    about a kind absent by that category's sampling ("no"), so every category is exactly 50/50."""
    if per_category % 2:
        raise ValueError(f"pope_per_category must be even (one yes and one no per image), got {per_category}")
    rng = _stream(seed, "pope")
    scenes = [sample_scene(rng) for _ in range(per_category // 2)]
    positives = [rng.choice(scene.kinds) for scene in scenes]
    images = [_image(scene, image_size, f"world_pope_{i:05d}.png") for i, scene in enumerate(scenes)]
    rows: Rows = []
    for category in NEGATIVE_STRATEGIES:
        for i, (scene, positive) in enumerate(zip(scenes, positives, strict=True)):
            for kind, answer in ((positive, "yes"), (sample_negative(scene, category, rng), "no")):
                row = {
                    "id": str(len(rows)), "question_id": str(len(rows) + 1), "question": existence_question(kind),
                    "answer": answer, "image_source": f"world_pope_{i:05d}", "image": images[i], "category": category,
                }
                rows.append((row, scene))
    return rows


def mmmu_rows(seed: int, size: int, image_size: int = 64) -> Rows:
    """MMMU validation: subjects in turn get an equal share, numbered from 1; about OPEN_FRACTION open."""
    rng = _stream(seed, "mmmu")
    rows: Rows = []
    for index, subject in enumerate(SUBJECTS):
        for number in range(1, size // len(SUBJECTS) + (index < size % len(SUBJECTS)) + 1):
            scene = sample_scene(rng, text=True if subject == "Text_Reading" else None)
            question = subject_question(subject, scene, rng)
            is_open = rng.random() < OPEN_FRACTION
            options, answer = ([], question.answer) if is_open else choice_options(question, rng)
            row_id = f"validation_{subject}_{number}"
            row = {
                "id": row_id, "question": question.text, "options": repr(options), "explanation": question.explanation,
                "image_1": _image(scene, image_size, f"{row_id}.png"), **{f"image_{k}": None for k in range(2, 8)},
                "img_type": "['Diagrams']", "answer": answer, "topic_difficulty": DIFFICULTY[len(scene.objects)],
                "question_type": "open" if is_open else "multiple-choice", "subfield": SUBFIELDS[subject],
            }
            rows.append((row, scene))
    return rows


def textvqa_rows(seed: int, size: int, image_size: int = 64) -> Rows:
    rng = _stream(seed, "textvqa")
    rows: Rows = []
    for i in range(size):
        scene = sample_scene(rng, text=True)
        question = textvqa_question(scene, rng)
        row = {
            "image_id": f"{i:016x}", "question_id": i, "question": question,
            "question_tokens": re.findall(r"[a-z0-9]+", question), "image": _image(scene, image_size, f"{i:016x}.png"),
            "image_width": image_size, "image_height": image_size, "flickr_original_url": "", "flickr_300k_url": "",
            "answers": reference_answers(scene.text, rng),
            "image_classes": sorted({obj.shape.capitalize() for obj in scene.objects}) + ["Text"],
            "set_name": "val", "ocr_tokens": [scene.text],
        }
        rows.append((row, scene))
    return rows


def training_scenes(seed: int, size: int, reserved: set[Scene] | frozenset[Scene] = frozenset()) -> list[Scene]:
    """`size` training scenes, skipping any in `reserved` (the benchmark scenes)."""
    rng = _stream(seed, "train")
    scenes: list[Scene] = []
    while len(scenes) < size:
        scene = sample_scene(rng)
        if scene not in reserved:
            scenes.append(scene)
    return scenes


def _hf_feature(arrow_type: pa.DataType) -> dict:
    """The `datasets` feature spec for an arrow type, as the hub's parquet files record it."""
    if arrow_type == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(arrow_type):
        return {"feature": _hf_feature(arrow_type.value_type), "_type": "Sequence"}
    return {"dtype": str(arrow_type), "_type": "Value"}


def write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    features = {field.name: _hf_feature(field.type) for field in schema}
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_training(directory: Path, scenes: list[Scene], seed: int, image_size: int, report: ProgressCallback) -> None:
    rng = _stream(seed, "train/conversations")
    (directory / "images").mkdir(parents=True)
    records = []
    for index, scene in enumerate(scenes):
        image = f"images/{index:06d}.png"
        (directory / image).write_bytes(png_bytes(render(scene, image_size)))
        records.append({"id": f"world-{index:06d}", "image": image, "conversations": training_conversation(scene, rng)})
        if (index + 1) % 200 == 0 or index + 1 == len(scenes):
            report("train", index + 1, len(scenes))
    (directory / "conversations.json").write_text(json.dumps(records, ensure_ascii=False))


def world_paths(root: str | os.PathLike) -> WorldPaths:
    root = Path(root)
    return WorldPaths(
        root, root / "train/conversations.json", root / "train/images",
        *(root / BENCHMARK_FILES[name] for name in ("pope", "mmmu", "textvqa")),
    )


def generate_world(
    output_dir: str | os.PathLike, seed: int = 0, train_size: int = 20_000, pope_per_category: int = 100,
    mmmu_size: int = 150, textvqa_size: int = 150, image_size: int = 64, overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
) -> WorldPaths:
    """Write the whole world (layout in the module docstring) atomically, as every matvlm output is written
    (`atomic_directory`): into a temporary folder beside `output_dir`, renamed into place only once
    complete, with the umask's modes. Same arguments, same bytes."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True to replace it")
    report = on_progress or (lambda stage, done, total: None)
    with atomic_directory(output_dir, overwrite) as staging:
        benchmarks = {
            "pope": (pope_rows(seed, pope_per_category, image_size), POPE_SCHEMA),
            "mmmu": (mmmu_rows(seed, mmmu_size, image_size), MMMU_SCHEMA),
            "textvqa": (textvqa_rows(seed, textvqa_size, image_size), TEXTVQA_SCHEMA),
        }
        for name, (rows, schema) in benchmarks.items():
            write_parquet([row for row, _ in rows], schema, staging / BENCHMARK_FILES[name])
            report(name, 1, 1)
        reserved = {scene for rows, _ in benchmarks.values() for _, scene in rows}
        _write_training(staging / "train", training_scenes(seed, train_size, reserved), seed, image_size, report)
        manifest = {
            "version": WORLD_VERSION, "seed": seed, "train_size": train_size, "pope_per_category": pope_per_category,
            "mmmu_size": mmmu_size, "textvqa_size": textvqa_size, "image_size": image_size,
        }
        (staging / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return world_paths(output_dir)
