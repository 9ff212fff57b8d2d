"""Distillation data at scale: streamed JSON, one tokenisation per record, the prepared Arrow cache,
text-only records, length-grouped batches and the chunked logit losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from matvlm_cli.distill.data import ConversationDataset, EpochShuffle, LengthGroupedShuffle, collate
from matvlm_cli.distill.losses import ce_loss, chunked_logit_losses, kl_loss
from matvlm_cli.distill.prepare import prepare
from matvlm_cli.distill.records import RecordEncoder, image_token_count, iter_json_list, to_messages
from matvlm_cli.errors import MatvlmError
from matvlm_cli.hybrid.processors import load_processor
from matvlm_cli.paths import default_teacher_dir
from matvlm_cli.recipes import DataSource
from matvlm_cli.world import generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w") / "world", seed=5, train_size=60).root


@pytest.fixture(scope="module")
def processor():
    return load_processor(default_teacher_dir())


def source(path: Path, world: Path, weight: float = 1.0) -> DataSource:
    return DataSource(json=str(path), image_root=str(world / "train"), weight=weight)


def multi_turn(world: Path, count: int) -> list[dict]:
    """The world's records, each given several more question-answer turns and a text-only twin."""
    records = json.loads((world / "train" / "conversations.json").read_text())[:count]
    out = []
    for i, record in enumerate(records):
        extra = [{"from": "human", "value": "how many circles are there ?"}, {"from": "gpt", "value": "there are two ."}]
        out.append(record | {"conversations": record["conversations"] + extra * (i % 4)})
        text = [dict(turn, value=turn["value"].replace("<image>\n", "")) for turn in out[-1]["conversations"]]
        out.append({"id": f"text-{i}", "conversations": text})
    return out


def prefix_token_labels(record: dict, processor, image_tokens: int) -> tuple[list[int], list[int]]:
    """The labels by their definition, as the old encoder computed them: every assistant turn from the
    token count of its prefix with the generation prompt to that of its prefix through the turn."""
    messages = to_messages(record["conversations"], has_image="image" in record)
    tok = processor.tokenizer

    def count(text):
        return len(tok(text)["input_ids"]) + (image_tokens - 1) * text.count("<image>")

    full = processor.apply_chat_template(messages)
    ids = tok(full.replace("<image>", "<image>" * image_tokens))["input_ids"]
    labels = [-100] * len(ids)
    for j, message in enumerate(messages):
        if message["role"] == "assistant":
            start = count(processor.apply_chat_template(messages[:j], add_generation_prompt=True))
            end = count(processor.apply_chat_template(messages[: j + 1]))
            labels[start:end] = ids[start:end]
    return ids, labels


def test_prepared_records_equal_the_prefix_definition(world, processor, tmp_path):
    records = multi_turn(world, 24)
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    prepared = prepare([source(data, world)], default_teacher_dir(), processor, 1024, tmp_path / "cache", workers=2)
    dataset = ConversationDataset(prepared, [source(data, world)], processor)
    assert len(dataset) == len(records) and prepared.skipped.total == 0
    image_tokens = image_token_count(processor)
    by_id = {r["id"]: r for r in records}
    for index in range(len(dataset)):
        item = dataset[index]
        ids, labels = prefix_token_labels(by_id[item["id"]], processor, image_tokens)
        assert item["input_ids"].tolist() == ids
        assert item["labels"].tolist() == labels
        assert ("pixel_values" in item) == (not item["id"].startswith("text-"))
    # well past the encoder's checks, the fast path is still the one in use and still exact
    encoder = RecordEncoder(processor, 1024, image_tokens)
    for record in records * 2:
        messages = to_messages(record["conversations"], has_image="image" in record)
        assert encoder.text_and_spans(messages) == encoder._exact(messages)
    assert encoder.render is not None


def test_data_of_one_task_is_prepared_in_process_into_the_same_cache_as_a_pool_makes(world, processor, tmp_path, monkeypatch):
    """At most RECORDS_PER_TASK records are encoded in the calling process (no pool to start); more go to
    the pool, task by task. The same records give the same Arrow file either way."""
    from matvlm_cli.distill import prepare as preparing

    records = multi_turn(world, 24)
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    started = []
    monkeypatch.setattr(preparing, "_start_worker", lambda *args: started.append(args))  # a spawned worker never sees this
    alone = prepare([source(data, world)], default_teacher_dir(), processor, 1024, tmp_path / "alone", workers=1)
    assert started == [] and alone.rebuilt
    monkeypatch.undo()
    monkeypatch.setattr(preparing, "RECORDS_PER_TASK", 5)  # 24 records: five tasks, so the pool
    pooled = prepare([source(data, world)], default_teacher_dir(), processor, 1024, tmp_path / "pooled", workers=1)
    assert pooled.rebuilt and pooled.table(0).num_rows == len(records)
    assert pooled.table(0).equals(alone.table(0))


def test_json_list_is_streamed_element_by_element(tmp_path):
    records = [{"id": str(i), "value": "x" * (i * 7), "n": i * 1.5} for i in range(40)] + [5, "text", None, [1, 2]]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records, indent=1))
    assert list(iter_json_list(path, block=5)) == records  # elements and numbers cut across blocks
    path.write_text("[]")
    assert list(iter_json_list(path)) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (b'[{"id": 1},\n {"id": 2,,}]', r"not valid JSON \(line 2"),
        (b'[{"id": 1} {"id": 2}]', "expected .,. or"),
        (b'{"id": 1}', "expected a JSON list"),
        (b"\xff\xfe\x00\x01binary", "not UTF-8"),
        (b'[{"id": 1}', "not valid JSON"),
    ],
)
def test_broken_json_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(MatvlmError, match=message):
        list(iter_json_list(path, block=4))


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(world, processor, tmp_path):
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(multi_turn(world, 6)))
    sources, cache = [source(data, world)], tmp_path / "cache"
    first = prepare(sources, default_teacher_dir(), processor, 1024, cache, workers=1)
    again = prepare(sources, default_teacher_dir(), processor, 1024, cache, workers=1)
    assert first.rebuilt and not again.rebuilt and again.directory == first.directory
    shorter = prepare(sources, default_teacher_dir(), processor, 60, cache, workers=1)
    assert shorter.rebuilt and shorter.directory != first.directory and shorter.skipped.total > 0
    data.write_text(json.dumps(multi_turn(world, 5)))  # the data file changes
    changed = prepare(sources, default_teacher_dir(), processor, 1024, cache, workers=1)
    assert changed.rebuilt and changed.directory != first.directory
    other_processor = tmp_path / "processor"
    other_processor.mkdir()
    for f in default_teacher_dir().iterdir():
        if f.suffix != ".safetensors":
            (other_processor / f.name).write_bytes(f.read_bytes())
    template = other_processor / "chat_template.jinja"
    template.write_text(template.read_text().replace("ASSISTANT:", "BOT:"))
    retemplated = prepare(sources, other_processor, load_processor(other_processor), 1024, cache, workers=1)
    assert retemplated.rebuilt and retemplated.directory != changed.directory


def test_a_killed_preparation_leaves_no_cache_a_later_run_trusts(world, tmp_path):
    records = multi_turn(world, 30) * 150  # long enough to be killed midway
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    cache = tmp_path / "cache"
    script = (
        "import sys; from pathlib import Path; from matvlm_cli.distill.prepare import prepare; "
        "from matvlm_cli.hybrid.processors import load_processor; from matvlm_cli.recipes import DataSource; "
        "from matvlm_cli.paths import default_teacher_dir as d; "
        f"prepare([DataSource(json={str(data)!r}, image_root={str(world / 'train')!r})], d(), load_processor(d()), 1024, Path({str(cache)!r}), workers=1)"
    )
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(cache.glob(".*.tmp/source-0.arrow")):
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]  # only the hidden temp folder
    processor = load_processor(default_teacher_dir())
    rebuilt = prepare([source(data, world)], default_teacher_dir(), processor, 1024, cache, workers=1)
    assert rebuilt.rebuilt and len(ConversationDataset(rebuilt, [source(data, world)], processor)) == len(records)


def test_text_only_records_can_be_skipped_and_are_reported(world, processor, tmp_path):
    records = multi_turn(world, 4)
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    prepared = prepare([source(data, world)], default_teacher_dir(), processor, 1024, tmp_path / "c", skip_text_only=True, workers=1)
    assert prepared.skipped.counts == {"text-only (skip_text_only: true)": 4}
    batch = collate([ConversationDataset(prepare([source(data, world)], default_teacher_dir(), processor, 1024, tmp_path / "c",
                                                 workers=1), [source(data, world)], processor)[i] for i in range(4)], pad_id=1)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 2  # text-only rows carry no pixels


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda r: r | {"image": 5}, "'image' is not a file path"),
        (lambda r: r | {"image": ["a.png"]}, "'image' is not a file path"),
        (lambda r: r | {"conversations": r["conversations"] + [{"from": "human", "value": "and?"},
                                                               {"from": "gpt", "value": "<image> here"}]}, "<image> in an assistant turn"),
        (lambda r: r | {"conversations": ["USER: hi", "ASSISTANT: hello"]}, "a turn is not {from: human|gpt, value: str}"),
        (lambda r: {k: v for k, v in r.items() if k != "image"}, "<image> in the text but no 'image' file"),
    ],
)
def test_broken_records_are_reported_by_reason_and_id(world, processor, tmp_path, change, reason):
    good = json.loads((world / "train" / "conversations.json").read_text())[:2]
    data = tmp_path / "mix.json"
    data.write_text(json.dumps([change(good[0]), good[1]]))
    prepared = prepare([source(data, world)], default_teacher_dir(), processor, 1024, tmp_path / "c", workers=1)
    assert prepared.skipped.counts == {reason: 1} and prepared.skipped.examples[reason] == [good[0]["id"]]


def test_unreadable_images_are_reported_when_their_batch_is_built(world, processor, tmp_path):
    records = json.loads((world / "train" / "conversations.json").read_text())[:3]
    (tmp_path / "images").mkdir()
    for i, record in enumerate(records):
        (tmp_path / "images" / f"{i}.png").write_bytes((world / "train" / record["image"]).read_bytes())
        record["image"] = f"images/{i}.png"
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    src = DataSource(json=str(data), image_root=str(tmp_path))
    dataset = ConversationDataset(prepare([src], default_teacher_dir(), processor, 1024, tmp_path / "c", workers=1), [src], processor)
    batch = collate([dataset[i] for i in range(3)], pad_id=1)
    assert batch["input_ids"].shape[0] == 2
    assert [record_id for record_id, _ in batch["broken"]] == [records[1]["id"]]
    assert "unreadable image" in batch["broken"][0][1]


def test_length_grouped_batches_pad_less_and_stay_a_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(20, 1400, size=1003)
    grouped = LengthGroupedShuffle(lengths, seed=3, batch_size=8)
    plain = EpochShuffle(len(lengths), seed=3)

    def padding(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return 1 - sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches)

    order = list(grouped)
    assert sorted(order) == list(range(len(lengths)))  # every record once
    assert padding(order) < 0.1 < 0.4 < padding(list(plain))
    last_group = np.asarray(grouped.permutation()[800:])  # megabatches of 50 x 8: 400, 400, 203
    shortest = last_group[np.argsort(-lengths[last_group], kind="stable")][-3:]
    assert order[-3:] == shortest.tolist()  # the one short batch comes last, so no later batch shifts
    again = LengthGroupedShuffle(lengths, seed=3, batch_size=8)
    assert list(again) == order
    again.set_epoch(1)
    assert list(again) != order
    batches = [order[i : i + 8] for i in range(0, 1000, 8)]
    assert len({len(b) for b in batches}) == 1  # all full, so the DataLoader's batches are these


def test_chunked_losses_equal_the_full_logits_losses_and_their_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    student = torch.randn(3, 9, 16, requires_grad=True)
    teacher = torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :2] = False
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :4] = -100
    full_kl = kl_loss(head(student), head(teacher), mask, temperature=2.0)
    full_ce = ce_loss(head(student), labels)
    (grad_full,) = torch.autograd.grad(full_kl + full_ce, student)
    parts = chunked_logit_losses(head, head, student, teacher, mask, labels, temperature=2.0, chunk_elements=50 * 4)
    (grad_chunked,) = torch.autograd.grad(parts["kl"] + parts["ce"], student)
    assert torch.allclose(parts["kl"], full_kl, atol=1e-6) and torch.allclose(parts["ce"], full_ce, atol=1e-6)
    assert torch.allclose(grad_chunked, grad_full, atol=1e-6)
    response = labels != -100
    only_kl = chunked_logit_losses(head, head, student, teacher, response, None, chunk_elements=50 * 5)
    assert only_kl.keys() == {"kl"} and torch.allclose(only_kl["kl"], kl_loss(head(student), head(teacher), response), atol=1e-6)


def test_data_loader_workers_by_default_only_beside_an_accelerator():
    from matvlm_cli.distill.loaders import default_workers

    assert default_workers(1, torch.device("cpu")) == 0  # the CPU step already uses every core
    assert 0 <= default_workers(1, torch.device("cuda")) <= 8
    assert default_workers(10**6, torch.device("cuda")) == 0  # no spare core per process
