"""Every VLM family of tests/zoo.py with its real processor, through distill, evaluate and generate: image
tokens counted per image from the processor's own output (their number depends on the image's size for
Qwen-VL, Idefics3, InternVL and LLaVA-NeXT/OneVision), the processor's every tensor carried to the model's
forward, and each family's chat template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zoo
from PIL import Image

from matvlm_cli.distill.data import RecordReader, collate
from matvlm_cli.distill.records import ImageInputs, RecordEncoder, image_token_count, to_messages

pytestmark = pytest.mark.usefixtures("one_thread")

# (width, height) of the records' images: different sizes and aspect ratios
SIZES = [(32, 32), (80, 48), (40, 96), (64, 64)]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
QUESTIONS = ["what is in the image ?", "how many circles are there ?", "which shape is shown ?", "is there a red star ?"]
ANSWERS = ["a red circle .", "there are two .", "a blue square .", "no ."]


def write_records(root: Path, text_only: bool = True) -> Path:
    """LLaVA-format records with images of different sizes (and one text-only record) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (size, colour) in enumerate(zip(SIZES, COLOURS)):
        image = Image.new("RGB", size, colour)
        image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        image.save(root / f"image-{i}.png")
        records.append({"id": f"r{i}", "image": f"image-{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i]}"}, {"from": "gpt", "value": ANSWERS[i]},
            {"from": "human", "value": "what colour is it ?"}, {"from": "gpt", "value": "it is red ."}]})
    if text_only:
        records.append({"id": "t0", "conversations": [{"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a shape ."}]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def expected_count(processor, record: dict, root: Path) -> int:
    """The image tokens of the record's image as the processor's own call counts them (on its placeholder)."""
    image = Image.open(root / record["image"]).convert("RGB")
    placeholder = ImageInputs(processor).placeholder
    out = processor(images=[image], text=[placeholder], return_tensors="pt")
    return int((out["input_ids"] == model_image_token(processor)).sum())


def model_image_token(processor) -> int:
    """The id the model replaces by image features (every zoo config uses the same)."""
    return zoo.IMAGE_TOKEN_ID


def read(processor, path: Path, max_length: int = 1000):
    encoder = RecordEncoder(processor, max_length, image_token_count(processor))
    reader = RecordReader(processor, image_token_count(processor), max_length)
    records = json.loads(path.read_text())
    items = []
    for record in records:
        encoded = encoder.encode(record, path.parent)
        stored = {"id": record["id"], "image": encoded["image"], "input_ids": encoded["input_ids"],
                  "label_spans": encoded["label_spans"].reshape(-1, 2)}
        items.append(reader.read(stored, path.parent))
    return records, items


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_two_records_with_different_image_sizes_collate_and_match_the_processor_alone(family, tmp_path):
    """Each row of a batch of two records whose images differ in size scores as the processor's own call on
    that record alone: the expansion, the image tensors (Qwen-VL's concatenated patches and grids,
    Idefics3's crop stacks padded to the batch's most) and the M-RoPE positions Qwen-VL derives from them."""
    processor, model = zoo.processor(family), zoo.build(family)
    path = write_records(tmp_path, text_only=False)
    records, items = read(processor, path)
    pair = [items[0], items[2]]  # 32x32 and 40x96
    assert len(pair[0]["input_ids"]) != len(pair[1]["input_ids"]) or family == "idefics3"
    batch = collate(pair, pad_id=processor.tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", *batch["model_inputs"])}
    with torch.no_grad():
        batched = model(**inputs).logits
        for row, index in enumerate((0, 2)):
            record = records[index]
            text = processor.apply_chat_template(to_messages(record["conversations"], True))
            image = Image.open(path.parent / record["image"]).convert("RGB")
            alone = processor(images=[image], text=[text], return_tensors="pt")
            alone.pop("labels", None)
            n = alone["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][row, :n], alone["input_ids"][0])
            assert (model(**alone).logits[0] - batched[row, :n]).abs().max() < 1e-4
            labels = batch["labels"][row]
            answer = processor.tokenizer(ANSWERS[index], add_special_tokens=False)["input_ids"]
            assert labels[labels != -100][: len(answer)].tolist() == answer  # the spans moved with the expansion


# -- end to end --------------------------------------------------------------------------------------
# Packages a family's processor needs beyond matvlm's: where one is missing, that family is skipped (SmolVLM's
# num2words comes with the test extra, so only Mistral 3's, Pixtral's, torchvision can be missing); the other ten
# always run.
NEEDS = {"smolvlm": ("num2words",), "mistral3": ("torchvision",)}


def _available(family: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in NEEDS.get(family, ()))


E2E_FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(not _available(f), reason=f"{f}'s processor needs {' and '.join(NEEDS.get(f, ()))}"))
                for f in zoo.VLM_FAMILIES]


@pytest.mark.parametrize("family", E2E_FAMILIES)
def test_each_record_holds_as_many_image_tokens_as_its_processor_gives(family, tmp_path):
    processor = zoo.processor(family)
    path = write_records(tmp_path)
    records, items = read(processor, path)
    counts = []
    for record, item in zip(records, items):
        if "image" in record:
            counts.append(int((item["input_ids"] == model_image_token(processor)).sum()))
            assert counts[-1] == expected_count(processor, record, path.parent) > 0, record["id"]
        else:
            assert "image_inputs" not in item and "pixel_values" not in item
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl", "llava_next", "llava_onevision"):
        assert len(set(counts)) > 1, counts  # the count depends on the image's size


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data"))


def distill_recipe(teacher: Path, student: Path, data: Path, out: Path):
    from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe

    recipe = build_recipe(DistillRecipe, {
        "teacher": str(teacher), "student": {"path": str(student)},
        "data": [{"json": str(data), "image_root": str(data.parent)}], "model_max_length": 400,
        "optimizer": {"lr": 1e-3, "warmup_steps": 1, "decay_steps": 1},
        "training": {"batch_size": 2, "max_steps": 3}, "output": {"dir": str(out), "save_every": 0},
    })
    check_distill_recipe(recipe)
    return recipe


@pytest.mark.parametrize("family", E2E_FAMILIES)
def test_convert_distill_evaluate_and_generate_end_to_end(family, data, tmp_path, monkeypatch):
    from rich.console import Console

    from matvlm_cli.convert import run_convert
    from matvlm_cli.distill.trainer import run_distill
    from matvlm_cli.evaluate.run import run_evaluate
    from matvlm_cli.generate import run_generate
    from matvlm_cli.recipes import ConvertRecipe, EvaluateRecipe

    monkeypatch.setenv("MATVLM_CACHE", str(data.parent / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(data.parent / "cache" / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    console = Console(record=True, width=200)
    teacher = zoo.save(family, tmp_path / "teacher")
    hybrid = run_convert(ConvertRecipe(teacher=str(teacher), output=str(tmp_path / "hybrid"), ratio=0.5), console)
    final = run_distill(distill_recipe(teacher, hybrid, data, tmp_path / "distill"), console)
    summary = json.loads((tmp_path / "distill" / "summary.json").read_text())
    assert summary["steps"] == 3 and not summary["unreadable_images"], summary
    steps = [json.loads(line) for line in (tmp_path / "distill" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(s["loss"]) for s in steps)
    out = tmp_path / "evaluate"
    run_evaluate(EvaluateRecipe(models=[str(final)], tasks=["pope", "mmmu", "textvqa"], limit=2, batch_size=2,
                                output=str(out), device="cpu"), console)
    results = json.loads((out / "final" / "results.json").read_text())
    assert set(results["results"]) >= {"pope", "mmmu_val", "textvqa_val"}
    for task in ("pope", "mmmu_val", "textvqa_val"):
        samples = [json.loads(line) for line in (out / "final" / f"samples_{task}.jsonl").read_text().splitlines()]
        assert len(samples) == 2
    answer = run_generate(final, data.parent / "image-1.png", "what is in the image ?", max_new_tokens=4, console=console)
    assert isinstance(answer, str)


def test_an_image_record_whose_template_gives_no_placeholder_is_skipped_with_a_reason(tmp_path):
    """A chat template that renders no image placeholder: each image record is skipped, counted under one
    reason that names the placeholder, and the text-only record is kept."""
    import matvlm_cli.distill.prepare as prepare_module
    from matvlm_cli.distill.prepare import _encode_task

    processor = zoo.processor("qwen2_vl")
    processor.chat_template = zoo.chat_template("qwen2_vl", placeholder="")
    processor.tokenizer.chat_template = processor.chat_template
    path = write_records(tmp_path)
    prepare_module._worker = RecordEncoder(processor, 1000, image_token_count(processor))
    try:
        batch, skipped = _encode_task((str(tmp_path), json.loads(path.read_text())))
    finally:
        prepare_module._worker = None
    assert batch.num_rows == 1 and skipped.total == 4
    (line,) = skipped.lines()
    assert line.startswith("skipped 4 record(s): the chat template gave 0 image placeholders (<|image_pad|>) for one image")


def test_an_image_the_processor_refuses_is_a_broken_record_not_a_crash(tmp_path):
    processor = zoo.processor("qwen2_vl")
    path = write_records(tmp_path, text_only=False)
    Image.new("RGB", (2, 500)).save(tmp_path / "image-0.png")  # Qwen-VL refuses an aspect ratio over 200
    _, items = read(processor, path)
    assert items[0]["broken"].startswith("the processor failed on its image (ValueError")
    assert all("broken" not in item for item in items[1:])


def test_paligemma_reads_its_answers_causally(tmp_path):
    """PaliGemma's records get token types 0 over image and prompt and 1 from the first answer on (as its
    processor marks a `suffix`), so the teacher's logits on the answers do not see the answer tokens after
    them. With 0 everywhere (the processor called on the whole conversation) they would."""
    from matvlm_cli.families import model_family

    processor = zoo.processor("paligemma")
    key = model_family(zoo.config("paligemma")).prefix_lm_token_types
    path = write_records(tmp_path, text_only=False)
    record = json.loads(path.read_text())[1]
    encoded = RecordEncoder(processor, 1000, image_token_count(processor)).encode(record, path.parent)
    stored = {"id": record["id"], "image": encoded["image"], "input_ids": encoded["input_ids"],
              "label_spans": encoded["label_spans"].reshape(-1, 2)}
    item = RecordReader(processor, image_token_count(processor), 1000, key).read(stored, path.parent)
    first = int((item["labels"] != -100).nonzero()[0])
    types = item["per_token"][key]
    assert key == "token_type_ids" and types[:first].eq(0).all() and types[first:].eq(1).all()

    batch = collate([item], pad_id=processor.tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", *batch["model_inputs"])}
    later = inputs["input_ids"].clone()
    later[0, -2] = processor.tokenizer.convert_tokens_to_ids("circle")  # an answer token near the end
    model = zoo.build("paligemma").eval()

    def answer_logits(ids, token_types):
        with torch.no_grad():
            return model(**inputs | {"input_ids": ids, key: token_types}).logits[0, first:-2]

    assert torch.equal(answer_logits(inputs["input_ids"], inputs[key]), answer_logits(later, inputs[key]))
    all_prefix = torch.zeros_like(inputs[key])
    assert not torch.allclose(answer_logits(inputs["input_ids"], all_prefix), answer_logits(later, all_prefix), atol=1e-4)
