"""The synthetic visual-QA world: determinism, benchmark schemas and semantics, held-out images."""

from __future__ import annotations

import ast
import io
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from matvlm_cli.world import generate_world, world_vocabulary
from matvlm_cli.world.questions import (
    NEGATIVE_STRATEGIES,
    SUBJECTS,
    TOKEN_PATTERN,
    binding_negative,
    is_reading_prompt,
    reading_records,
    sample_negative,
)
from matvlm_cli.world.scenes import BACKGROUNDS, COLORS, render, sample_scene
from matvlm_cli.world.writers import (
    IMAGE_TYPE,
    mmmu_rows,
    pope_rows,
    textvqa_rows,
    training_scenes,
)

SMALL = dict(train_size=300, pope_per_category=10, mmmu_size=25, textvqa_size=20)
POPE_COLUMNS = ["id", "question_id", "question", "answer", "image_source", "image", "category"]
MMMU_COLUMNS = [
    "id", "question", "options", "explanation", *[f"image_{k}" for k in range(1, 8)],
    "img_type", "answer", "topic_difficulty", "question_type", "subfield",
]
TEXTVQA_COLUMNS = [
    "image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
    "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens",
]
EXISTENCE = re.compile(r"^Is there an? (\w+) (\w+) in the image\?$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world") / "w", seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _benchmark_images(world) -> list[bytes]:
    columns = [(world.pope, "image"), (world.mmmu, "image_1"), (world.textvqa, "image")]
    return [cell["bytes"] for path, column in columns for cell in pq.read_table(path)[column].to_pylist()]


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = generate_world(tmp_path / "again", seed=0, **SMALL)
    other = generate_world(tmp_path / "other", seed=1, **SMALL)
    reference = _files(world.root)
    assert _files(again.root) == reference
    different = _files(other.root)
    assert different.keys() == reference.keys()
    for path in ("train/conversations.json", "train/images/000000.png", *(
        str(p.relative_to(world.root)) for p in (world.pope, world.mmmu, world.textvqa)
    )):
        assert different[path] != reference[path], path


def test_same_bytes_in_another_process(world, tmp_path):
    """Nothing may depend on Python's per-process hash seed (set iteration order)."""
    code = f"from matvlm_cli.world import generate_world; generate_world({str(tmp_path / 'w')!r}, seed=0, **{SMALL!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert _files(tmp_path / "w") == _files(world.root)


def test_existing_output_refused_then_replaced_atomically(world, tmp_path):
    target = tmp_path / "w"
    generate_world(target, seed=0, **SMALL)
    with pytest.raises(FileExistsError):
        generate_world(target, seed=1, **SMALL)
    generate_world(target, seed=1, **SMALL, overwrite=True)
    assert json.loads((target / "world.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no staging or old folders left


def test_pope_balanced_and_answers_match_the_scene():
    rows = pope_rows(seed=3, per_category=20)
    per_category = Counter((row["category"], row["answer"]) for row, _ in rows)
    assert per_category == {(c, a): 10 for c in NEGATIVE_STRATEGIES for a in ("yes", "no")}
    for row, scene in rows:
        color, shape = EXISTENCE.match(row["question"]).groups()
        assert ((color, shape) in scene.kinds) == (row["answer"] == "yes"), row["question"]
    assert len({row["question_id"] for row, _ in rows}) == len(rows)


def test_pope_negative_strategies_differ_on_independent_statistics():
    """Popular negatives are more frequent, adversarial ones co-occur more with what is present, than
    random ones: measured on scenes the sampler never saw."""
    rng = random.Random(123)
    sample = [sample_scene(rng) for _ in range(3000)]
    frequency = Counter(kind for scene in sample for kind in scene.kinds)
    cooccurrence = Counter(pair for scene in sample for pair in itertools.permutations(scene.kinds, 2))
    scenes = [sample_scene(rng) for _ in range(400)]
    negatives = {s: [(scene, sample_negative(scene, s, rng)) for scene in scenes] for s in NEGATIVE_STRATEGIES}
    for strategy in NEGATIVE_STRATEGIES:
        assert all(kind not in scene.kinds for scene, kind in negatives[strategy])

    def mean_frequency(pairs):
        return statistics.mean(frequency[kind] for _, kind in pairs)

    def mean_cooccurrence(pairs):
        return statistics.mean(sum(cooccurrence[(p, kind)] for p in scene.kinds) for scene, kind in pairs)

    assert mean_frequency(negatives["popular"]) > 1.5 * mean_frequency(negatives["random"])
    assert mean_cooccurrence(negatives["adversarial"]) > 2 * mean_cooccurrence(negatives["random"])
    assert mean_cooccurrence(negatives["adversarial"]) > mean_cooccurrence(negatives["popular"])


def test_binding_negatives_cross_colours_and_shapes_of_different_objects():
    """An absent kind whose colour and shape are both in the picture, whenever the scene has one."""
    rng = random.Random(7)
    crossed = 0
    for scene in (sample_scene(rng) for _ in range(500)):
        color, shape = binding_negative(scene, rng)
        assert (color, shape) not in scene.kinds
        colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
        possible = any((c, s) not in scene.kinds for c in colors for s in shapes)
        assert (color in colors and shape in shapes) == possible
        crossed += possible
    assert crossed > 200  # most multi-object scenes have such a pair


def test_mmmu_rows_follow_the_mmmu_format_and_are_correct():
    rows = mmmu_rows(seed=0, size=150)
    ids = [re.match(r"^validation_(.+?)_(\d+)$", row["id"]) for row, _ in rows]
    by_subject = Counter(match.group(1) for match in ids)
    assert by_subject == {subject: 30 for subject in SUBJECTS}
    for subject in SUBJECTS:
        assert sorted(int(m.group(2)) for m in ids if m.group(1) == subject) == list(range(1, 31))
    n_open = 0
    for row, scene in rows:
        assert "<image 1>" in row["question"]
        assert row["image_1"]["bytes"] and all(row[f"image_{k}"] is None for k in range(2, 8))
        options = ast.literal_eval(row["options"])
        if row["question_type"] == "open":
            n_open += 1
            assert options == [] and row["answer"]
            value = row["answer"]
        else:
            assert row["question_type"] == "multiple-choice"
            assert len(options) == 4 == len(set(options)) and row["answer"] in "ABCD"
            value = options["ABCD".index(row["answer"])]
        subject = re.match(r"^validation_(.+?)_\d+$", row["id"]).group(1)
        truth = {
            "Color": [obj.color for obj in scene.objects], "Shape": [obj.shape for obj in scene.objects],
            "Spatial_Reasoning": [obj.position for obj in scene.objects],
            "Counting": [str(n) for n in range(len(scene.objects) + 1)],
            "Text_Reading": [(scene.text or "").lower()],
        }[subject]
        assert value in truth, (row["question"], value, scene)
    assert 0.1 < n_open / len(rows) < 0.35


def test_textvqa_rows_have_ten_human_like_answers():
    rows = textvqa_rows(seed=0, size=60)
    for row, scene in rows:
        canonical = scene.text.lower()
        assert len(row["answers"]) == 10 and row["answers"].count(canonical) >= 5
        assert row["ocr_tokens"] == [scene.text]
        assert row["question_tokens"] == re.findall(r"[a-z0-9]+", row["question"])
    variants = {a for row, _ in rows for a in row["answers"]} - {scene.text.lower() for _, scene in rows}
    assert variants  # annotators do not all answer alike


@pytest.mark.parametrize("name,columns", [("pope", POPE_COLUMNS), ("mmmu", MMMU_COLUMNS), ("textvqa", TEXTVQA_COLUMNS)])
def test_parquet_schemas_match_the_hub(world, name, columns):
    path = getattr(world, name)
    assert path.relative_to(world.root).parts[:2] == (name, "data")
    assert re.fullmatch(r"(test|validation)-00000-of-00001\.parquet", path.name)
    schema = pq.read_schema(path)
    assert schema.names == columns
    image_columns = [c for c in columns if c == "image" or c.startswith("image_") and c[6:].isdigit()]
    assert [field.name for field in schema if field.type == IMAGE_TYPE] == image_columns
    if name == "textvqa":
        assert schema.field("question_id").type == pa.int32()
        assert all(schema.field(c).type == pa.list_(pa.string()) for c in ("answers", "ocr_tokens", "question_tokens"))
    first = pq.read_table(path).slice(0, 1).to_pylist()[0][image_columns[0]]
    assert Image.open(io.BytesIO(first["bytes"])).size == (64, 64)
    datasets = pytest.importorskip("datasets")
    features = datasets.Features.from_arrow_schema(schema)
    assert all(isinstance(features[c], datasets.Image) for c in image_columns)


def test_training_json_is_llava_format(world):
    records = json.loads(world.train_json.read_text())
    assert len(records) == SMALL["train_size"]
    endings = Counter()
    for record in records:
        assert isinstance(record["id"], str) and (world.train_json.parent / record["image"]).is_file()
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        for human in turns[::2]:
            endings[human["value"].rsplit("\n", 1)[-1]] += 1
    assert {
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Describe the image.",
    } <= set(endings)


def test_reading_records_are_the_reading_turns_on_their_own(world):
    records = json.loads(world.train_json.read_text())
    reading = reading_records(records)
    with_reading = [r for r in records if any(is_reading_prompt(t["value"]) for t in r["conversations"][::2])]
    assert 0 < len(reading) == len(with_reading) < len(records)
    texts = {r["id"]: r for r in records}
    for record in reading:
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert human["value"].endswith("Answer the question using a single word or phrase.")
        assert "\nA. " not in human["value"]  # not a multiple-choice reading question
        source = texts[record["id"].removesuffix("-reading")]
        assert record["image"] == source["image"]
        answer = next(g["value"] for h, g in zip(source["conversations"][::2], source["conversations"][1::2])
                      if is_reading_prompt(h["value"]))
        assert gpt["value"] == answer
    assert not is_reading_prompt("What word is written in the image?\nA. kite\nB. cup\nC. car\nD. ball"
                                 "\n\nAnswer with the option's letter from the given choices directly.")


def test_benchmark_images_are_held_out(world):
    train = {p.read_bytes() for p in world.train_images.iterdir()}
    assert len(train) > 0.9 * SMALL["train_size"]
    assert train.isdisjoint(_benchmark_images(world))


def test_training_skips_reserved_scenes():
    unreserved = training_scenes(seed=0, size=40)
    reserved = set(unreserved[:10])
    assert reserved.isdisjoint(training_scenes(seed=0, size=40, reserved=reserved))


def test_rendered_cells_show_the_ground_truth():
    rng = random.Random(7)
    for scene in (sample_scene(rng, text=False) for _ in range(30)):
        image = render(scene)
        occupied = {obj.cell: obj.color for obj in scene.objects}
        for cell in range(9):
            row, col = divmod(cell, 3)
            edges = [round(i * 64 / 3) for i in range(4)]  # crop each cell 1 px inside its borders
            box = image.crop((edges[col] + 1, edges[row] + 1, edges[col + 1] - 1, edges[row + 1] - 1))
            colors = Counter(box.getdata())
            del colors[BACKGROUNDS[scene.background]]
            top = colors.most_common(1)[0][0] if colors else None
            assert top == (COLORS[occupied[cell]] if cell in occupied else None), (scene, cell)


def test_vocabulary_covers_everything_the_world_writes(world):
    vocabulary = set(world_vocabulary())
    texts = [t["value"] for r in json.loads(world.train_json.read_text()) for t in r["conversations"]]
    for row in pq.read_table(world.pope).drop(["image"]).to_pylist():
        texts += [row["question"], row["answer"]]
    for row in pq.read_table(world.mmmu).select(["question", "options", "answer", "explanation"]).to_pylist():
        texts += [row["question"], row["answer"], row["explanation"], *ast.literal_eval(row["options"])]
    for row in pq.read_table(world.textvqa).select(["question", "answers", "ocr_tokens"]).to_pylist():
        texts += [row["question"].capitalize(), *row["answers"], *row["ocr_tokens"]]
    missing = {token for text in texts for token in TOKEN_PATTERN.findall(text)} - vocabulary
    assert not missing
