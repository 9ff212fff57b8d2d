"""`training.shapes` (issue 25): no cache in a training forward, packed rows that keep their records apart
exactly (losses and gradients, attention, Mamba-2 conv and scan, images, labels), bucket and packing
plans, resume, bad input, and the throughput record in log.jsonl and summary.json."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import build_tiny_llava

from matvlm_cli.distill import throughput
from matvlm_cli.distill.data import collate
from matvlm_cli.distill.shapes import (
    PackedBatches,
    best_fit_decreasing,
    collate_packed,
    collate_to_bucket,
    default_buckets,
)
from matvlm_cli.distill.trainer import DistillRun, run_distill
from matvlm_cli.errors import MatvlmError
from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe
from matvlm_cli.world import generate_world

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world's records, plus a source of text-only records (the same conversations without
    their image), as LLaVA's mix has."""
    root = generate_world(tmp_path_factory.mktemp("w") / "world", seed=3, train_size=48).root
    records = json.loads((root / "train" / "conversations.json").read_text())
    text_only = []
    for record in records[:12]:
        turns = [dict(t, value=t["value"].replace("<image>\n", "").replace("<image>", "")) for t in record["conversations"]]
        text_only.append({"id": f"text-{record['id']}", "conversations": turns})
    (root / "train" / "text.json").write_text(json.dumps(text_only))
    return root


def values_for(world, out, **sections):
    train = world / "train"
    values = {
        "data": [{"json": str(train / "conversations.json"), "image_root": str(train)},
                 {"json": str(train / "text.json"), "image_root": str(train)}],
        "model_max_length": 400,
        "optimizer": {"lr": 1e-3, "warmup_steps": 1, "decay_steps": 2},
        "training": {"batch_size": 2, "max_steps": 4, "shapes": "packed", "pack_length": 800},
        "output": {"dir": str(out), "save_every": 2},
    }
    for key, value in sections.items():
        values[key] = values.get(key, {}) | value if isinstance(value, dict) else value
    return values


def make(values):
    recipe = build_recipe(DistillRecipe, values)
    check_distill_recipe(recipe)
    return recipe


# -- no cache ---------------------------------------------------------------------------------------

def test_no_cache_object_is_made_in_a_distill_step(world, tmp_path, monkeypatch):
    """Counts every transformers Cache built (the base class's __init__, which DynamicCache and the
    others call). A plain forward of the same model builds one, so the count can fail."""
    from transformers.cache_utils import Cache

    made = []
    original = Cache.__init__

    def counting(self, *args, **kwargs):
        made.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Cache, "__init__", counting)
    for shapes in ("padded", "packed"):
        training = {"shapes": shapes, "max_steps": 2} | ({} if shapes == "packed" else {"pack_length": None})
        run = DistillRun(make(values_for(world, tmp_path / shapes, training=training)))
        run.setup()
        made.clear()
        run.train()
        assert made == [], (shapes, made)
    # The check can fail: the same model's forward with transformers' defaults builds a cache.
    batch = next(iter(run.loader))
    with torch.no_grad():
        run.model(input_ids=batch["input_ids"][:, :32])
    assert made


# -- packed rows are exact -------------------------------------------------------------------------

def in_float64(run) -> None:
    """The run's model and the teacher's copies beside it in float64, for comparisons of two computations
    that are equal in exact arithmetic. In float32 their rounding differs with the shapes (the packed row
    against the record alone) and with the CPU's vector kernels: on a 2-core AVX-512 machine (session 20) one
    record's CE differed by 1.03e-5 of itself and a gradient by 9.5e-6 of its largest element, at the 1e-5
    bound, and with ATen's AVX2 kernels a gradient passed it. In float64 both stay below 2e-7 (the float32
    steps left inside: the losses' and the mixer's own casts), while a leak between records still shows at
    full size."""
    run.model.double()
    run.shared.move_teacher_copies(torch.float64)  # nn.Module.to takes a dtype as it takes a device


def losses_and_grads(run, batch) -> tuple[dict, dict]:
    model = run.model
    dtype = next(model.parameters()).dtype  # the images in the model's precision (float64 after in_float64)
    batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    parts = run._losses(batch)
    total = sum(w * parts[k] for k, w in run._weights().items() if w)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in parts.items()}, grads


def only_record(batch: dict, row: int, start: int, end: int) -> dict:
    """The packed batch with its losses read at one record's positions only (the model sees it all)."""
    keep = torch.zeros_like(batch["attention_mask"])
    keep[row, start:end] = 1
    return batch | {"attention_mask": batch["attention_mask"] * keep, "labels": batch["labels"].masked_fill(keep == 0, -100)}


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= tolerance * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def phi_teacher(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("phi"), family="phi", seed=2)


@pytest.mark.parametrize("teacher", ["embedded", "phi"])
def test_a_packed_batch_gives_each_record_the_losses_and_gradients_it_has_alone(world, tmp_path, teacher, phi_teacher):
    """Two rows: two image records, then an image record and a text-only one. For each record, the losses
    read at its positions of the packed batch, and their gradients, equal those of the record alone
    (in float64, to 1e-5: `in_float64`): through attention, the Mamba-2 conv and scan (layers 1 and 2
    converted, so a mixer reads another mixer's output), the images' order and the labels at record starts."""
    values = values_for(world, tmp_path / "run", teacher=None if teacher == "embedded" else str(phi_teacher),
                        student={"layers": [1, 2]}, trainable="mamba+connector",
                        losses={"kl_weight": 1.0, "layer_weight": 1.0, "ce_weight": 1.0, "kl_positions": "all"})
    run = DistillRun(make(values))
    run.setup()
    in_float64(run)
    data = run.dataset
    images = [i for i in range(len(data)) if data.record(i)["image"] is not None]
    text = next(i for i in range(len(data)) if data.record(i)["image"] is None)
    chosen = [(images[0], 0), (images[1], 0), (images[2], 1), (text, 1)]
    items = [data[i] | {"row": row} for i, row in chosen]
    row_length = max(sum(len(it["input_ids"]) for it in items if it["row"] == r) for r in (0, 1)) + 5
    pad = run.processor.tokenizer.pad_token_id
    packed = collate_packed(items, pad, rows=2, row_length=row_length)
    assert packed["pixel_values"].shape[0] == 3 and packed["seq_idx"][1, -1] == 2  # row 1: two records, then padding

    at = {0: 0, 1: 0}
    leaked = []
    for item in items:
        n, row = len(item["input_ids"]), item["row"]
        alone = collate([item], pad)
        losses_alone, grads_alone = losses_and_grads(run, alone)
        mine = only_record(packed, row, at[row], at[row] + n)
        losses_packed, grads_packed = losses_and_grads(run, mine)
        assert losses_packed.keys() == losses_alone.keys() == {"kl", "layer", "ce"}
        for key in losses_alone:
            assert math.isclose(losses_packed[key], losses_alone[key], rel_tol=1e-5, abs_tol=1e-6), (item["id"], key)
        assert grads_alone and grads_alone.keys() <= grads_packed.keys()
        for name, grad in grads_packed.items():  # a text-only record alone gives the connector no gradient at all
            assert close(grad, grads_alone.get(name, torch.zeros_like(grad))), (item["id"], name)
        if at[row]:
            # A record after another one: without seq_idx the mixers carry the first into it (attention still
            # keeps them apart, from the position_ids), and the comparison above fails by far.
            no_boundaries = mine | {"model_inputs": [k for k in mine["model_inputs"] if k not in ("seq_idx", "cu_seq_lens_q", "max_length_q")]}
            _, grads_leaked = losses_and_grads(run, no_boundaries)
            leaked.append(max((grads_leaked[n] - grads_alone[n]).abs().max().item() / max(1.0, grads_alone[n].abs().max().item())
                              for n in grads_alone))
            assert leaked[-1] > 100 * 1e-5, leaked
        at[row] += n
    assert len(leaked) == 2


def test_the_packed_batch_loss_is_the_padded_batch_loss(world, tmp_path):
    """The same records as one padded batch and as packed rows: the same loss and gradients (every loss
    averages over the same token positions)."""
    run = DistillRun(make(values_for(world, tmp_path / "run", losses={"ce_weight": 1.0, "kl_positions": "response"})))
    run.setup()
    items = [run.dataset[i] for i in range(4)]
    pad = run.processor.tokenizer.pad_token_id
    padded_losses, padded_grads = losses_and_grads(run, collate(items, pad))
    rows = best_fit_decreasing(list(range(4)), np.array([len(it["input_ids"]) for it in items]), 800)
    packed = collate_packed([items[i] | {"row": r} for r, row in enumerate(rows) for i in row], pad, rows=len(rows), row_length=800)
    packed_losses, packed_grads = losses_and_grads(run, packed)
    for key in padded_losses:
        assert math.isclose(packed_losses[key], padded_losses[key], rel_tol=1e-5), key
    assert all(close(packed_grads[n], padded_grads[n]) for n in padded_grads)


# -- plans and collation ----------------------------------------------------------------------------

def test_packing_plans_hold_every_record_once_within_the_budget_and_are_a_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(20, 600, size=2000)
    sampler = PackedBatches(lengths, rows=4, row_length=1024, seed=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        records = [i for batch in batches for i, _ in batch]
        assert sorted(records) == list(range(2000)) and len(batches) == len(sampler)
        for batch in batches:
            rows = {}
            for i, row in batch:
                rows[row] = rows.get(row, 0) + lengths[i]
            assert max(rows) < 4 and max(rows.values()) <= 1024
        slots = len(batches) * 4 * 1024
        assert 1 - lengths.sum() / slots < 0.02, 1 - lengths.sum() / slots
        again = PackedBatches(lengths, rows=4, row_length=1024, seed=1)
        again.set_epoch(epoch)
        assert list(again) == batches
    sampler.set_epoch(0)
    assert list(sampler) != batches


def test_buckets_pad_to_the_next_bucket():
    items = [{"id": str(n), "input_ids": torch.ones(n, dtype=torch.long), "labels": torch.ones(n, dtype=torch.long)} for n in (30, 70)]
    batch = collate_to_bucket(items, 0, [64, 128, 256])
    assert batch["input_ids"].shape == (2, 128) and batch["attention_mask"].sum() == 100
    assert default_buckets(2048) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert default_buckets(400) == [56, 104, 152, 200, 256, 304, 352, 400]


# -- runs: resume, errors, throughput record --------------------------------------------------------

def test_a_packed_run_resumed_gives_the_same_weights(world, tmp_path):
    class Interrupt(Exception):
        pass

    def stop_at_2(step):
        if step == 2:
            raise Interrupt

    straight = run_distill(make(values_for(world, tmp_path / "a")))
    with pytest.raises(Interrupt):
        run_distill(make(values_for(world, tmp_path / "b")), on_step=stop_at_2)
    resumed = run_distill(make(values_for(world, tmp_path / "b", output={"resume": "auto"})))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(entry["padding"] < 0.5 for entry in log)


def test_a_budget_shorter_than_the_longest_record_is_one_line_naming_it(world, tmp_path):
    with pytest.raises(MatvlmError, match=r"^training.pack_length: 100 tokens is shorter than record \S+ \(\d+ tokens, the longest\)"):
        run_distill(make(values_for(world, tmp_path / "run", training={"pack_length": 100})))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("training,message", [
    ({"shapes": "buckets", "buckets": [128, 256], "pack_length": None},
     "'training.buckets': the longest bucket (256) does not cover model_max_length (400)"),
    ({"shapes": "buckets", "buckets": [256, 128, 400], "pack_length": None}, "'training.buckets' must be lengths >= 1 in ascending order"),
    ({"shapes": "padded"}, "'training.pack_length' is read with training.shapes: packed only"),
    ({"shapes": "rows"}, "'training.shapes' must be one of padded, buckets, packed"),
])
def test_shape_settings_are_checked_before_anything_loads(world, tmp_path, training, message):
    with pytest.raises(MatvlmError) as error:
        make(values_for(world, tmp_path / "run", training=training))
    assert message in str(error.value)


def test_throughput_is_recorded_in_the_log_and_the_summary(world, tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "WINDOW", (2, 5))  # the run's 10-60 window, scaled to a 6-step run
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))  # a graph of this process, not of the run
    run_distill(make(values_for(world, tmp_path / "run", training={"max_steps": 6}, output={"log_every": 100})))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 5, 6]  # the first step and the window's end are always logged
    assert log[0]["seconds_to_first_step"] > 0 and log[1]["tokens_per_s_10_60"] > 0
    assert 0 < log[1]["mfu_10_60"] < 1 and 0 <= log[1]["padding_10_60"] < 0.5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["throughput"]
    assert summary["steps_10_60"]["steps"] == 3 and summary["run"]["steps"] == 6
    assert summary["run"]["tokens"] == log[-1]["tokens"] and summary["compiled_graphs"] == 0
    assert summary["flops_per_token"] > 6 * 1e6 and summary["peak_flops"] > 1e8


def test_a_compiled_packed_run_makes_all_its_graphs_in_its_first_step(world, tmp_path):
    """training.compile on packed rows, over an epoch's end (a short last batch, padded to its rows): every
    graph is made in the first step (each region once per grad mode, the norms once more for an input
    that requires grad) and none after. With the cache the training forward used to build, or with the
    record count's dimension left static, the attention region recompiled at every new count until dynamo's
    limit of 8 (issue 25)."""
    run_distill(make(values_for(world, tmp_path / "run", training={"max_steps": 8, "compile": True})))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["throughput"]
    assert log[-1]["epoch"] >= 1 and summary["compiled_graphs"] > 0
    assert {entry["compiled_graphs"] for entry in log} == {summary["compiled_graphs"]}
    assert summary["graphs_per_region"] and max(summary["graphs_per_region"].values()) <= 3, summary["graphs_per_region"]


def test_the_progress_line_fits_80_columns_with_its_numbers_whole(world, tmp_path):
    """In an 80-column terminal the bar shows the step, the loss and tokens/s, then as many of the loss's
    parts as fit, none cut ("…"); a wide terminal shows them all, and the learning rate."""
    import io

    from rich.console import Console

    from matvlm_cli.distill.report import step_summary

    console = Console(width=80, record=True, file=io.StringIO())
    run_distill(make(values_for(world, tmp_path / "run", training={"max_steps": 3})), console)
    text = console.export_text()
    (bar,) = [line for line in text.splitlines() if line.startswith("distill 3/3")]
    assert len(bar) <= 80 and "…" not in text
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert f"loss {last['loss']:.4g}" in bar and "tok/s" in bar and f"kl {last['kl']:.4g}" in bar
    stats = {"loss": 27.01801, "kl": 0.13688, "layer": 26.82117, "ce": 0.11981, "lr": 2.8e-4, "tokens_per_s": 1623}
    assert step_summary(stats, 200) == "loss 27.02  1623 tok/s  kl 0.1369  layer 26.82  ce 0.1198  lr 2.80e-04"
    assert step_summary(stats, 30) == "loss 27.02  1623 tok/s"
