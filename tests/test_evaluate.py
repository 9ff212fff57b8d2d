"""`matvlm evaluate` on the real lm-eval harness, no mocks: the embedded teacher on the synthetic sets, its
answers cross-checked against the independent quick check in matvlm_cli.evaluate.quality, teacher and hybrid
side by side, --data-dir layouts, a text task passed straight through, batching and log-likelihoods of the
lm-eval model, and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from matvlm_cli.evaluate.metrics import vqa_accuracy
from matvlm_cli.paths import default_teacher_dir
from matvlm_cli.world.questions import CHOICE_ANSWER, SHORT_ANSWER

LIMIT = 24  # documents per task in the teacher's run: the first POPE rows are all "adversarial"
TEACHER = default_teacher_dir()
TEXT_TASK = """\
task: world_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "USER: {{{{question}}}} ASSISTANT:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
TEXT_DOCS = [
    {"question": "Is there a red circle in the image?", "choices": ["yes", "no"], "label": 0},
    {"question": "What shape is it?", "choices": ["circle", "square", "star"], "label": 2},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private cache for the synthetic sets and for `datasets` (which never asks the hub), a terminal wide
    enough for the table, and one thread per subprocess (see one_thread)."""
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "MATVLM_CACHE": str(cache), "HF_DATASETS_CACHE": str(cache / "hf"), "HF_HUB_OFFLINE": "1",
            "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def evaluate(env, *args, cwd=None):
    command = [sys.executable, "-m", "matvlm_cli", "evaluate", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def in_this_process(env, monkeypatch):
    """The private caches of `env` for a command line run through the `cli` fixture."""
    for name in ("MATVLM_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    """A text-only lm-eval task (multiple choice, so scored by log-likelihood) reading a local JSON file."""
    folder = tmp_path_factory.mktemp("text-task")
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in TEXT_DOCS))
    (folder / "world_choice.yaml").write_text(TEXT_TASK.format(data=folder / "docs.jsonl"))
    return folder / "world_choice.yaml"


@pytest.fixture(scope="module")
def teacher_run(env, text_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher-run")
    result = evaluate(env, "--tasks", f"pope,mmmu,textvqa,{text_task}", "--limit", LIMIT, "--batch-size", 6,
                      "--device", "cpu", "--output", out, cwd=out)  # outside any git repository
    assert result.returncode == 0, result.stderr
    return out, result


def test_a_run_outside_a_git_repository_keeps_stderr_quiet(teacher_run):
    _, result = teacher_run
    assert "not a git repository" not in result.stderr and "fatal" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def world(env, teacher_run):
    """The synthetic sets, as the teacher's run wrote them into the private cache."""
    return Path(env["MATVLM_CACHE"]) / "world-seed0"


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    from matvlm_cli.convert import run_convert
    from matvlm_cli.recipes import ConvertRecipe

    return run_convert(ConvertRecipe(ratio=0.25, output=str(tmp_path_factory.mktemp("convert") / "hybrid")))


def test_results_json_has_lm_eval_layout_and_model_info(teacher_run, env):
    out, _ = teacher_run
    results = json.loads((out / "tiny-teacher" / "results.json").read_text())
    assert {"results", "configs", "versions", "n-samples", "higher_is_better", "config"} <= results.keys()
    assert "samples" not in results
    assert set(results["results"]) == {"pope", "mmmu_val", "textvqa_val", "world_choice"}
    assert {task: n["effective"] for task, n in results["n-samples"].items()} == {
        "pope": LIMIT, "mmmu_val": LIMIT, "textvqa_val": LIMIT, "world_choice": len(TEXT_DOCS)}
    pope = results["results"]["pope"]
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio", "llava_f1"):
        assert 0 <= pope[f"{metric},none"] <= 1
    assert set(pope["categories,none"]) == {"adversarial"} and pope["categories,none"]["adversarial"]["num"] == LIMIT
    assert pope["categories,none"]["adversarial"]["accuracy"] == pope["accuracy,none"]
    assert pope["llava_categories,none"]["adversarial"]["f1"] == pope["llava_f1,none"]
    mmmu = results["results"]["mmmu_val"]
    assert mmmu["subjects,none"] == {"Color": {"accuracy": mmmu["accuracy,none"], "num": LIMIT}}
    assert mmmu["domains,none"] == {"Other": {"accuracy": mmmu["accuracy,none"], "num": LIMIT}}
    assert 0 <= results["results"]["textvqa_val"]["accuracy,none"] <= 1
    assert 0 <= results["results"]["world_choice"]["acc,none"] <= 1  # passed straight through, log-likelihood
    config = results["config"]
    assert config["model_name"] == "tiny-teacher" and config["model"] == str(TEACHER)
    assert config["model_class"] == "LlavaForConditionalGeneration" and config["matvlm_hybrid"] is None
    assert config["model_num_parameters"] > 4_000_000 and config["limit"] == LIMIT and config["batch_size"] == 6
    assert config["matvlm"]["data_dir"] == str(Path(env["MATVLM_CACHE"]) / "world-seed0")
    assert (Path(env["MATVLM_CACHE"]) / "world-seed0" / "world.json").is_file()  # generated once, into the cache


def test_teacher_scores_well_above_chance_and_as_the_quick_check_does(teacher_run, world):
    """The harness's answers are the ones the independent quick check (evaluate.quality) gets with the same
    prompts, and the teacher is far above chance (POPE 0.5; it scores 0.83-0.96, MMMU 0.59, TextVQA 1.0)."""
    from matvlm_cli.evaluate.quality import benchmark_scores
    from matvlm_cli.hybrid.load import load_model

    out, _ = teacher_run
    results = json.loads((out / "tiny-teacher" / "results.json").read_text())["results"]
    quick = benchmark_scores(load_model(TEACHER), TEACHER, world, limit=LIMIT)
    assert results["pope"]["accuracy,none"] == pytest.approx(quick["pope_adversarial_accuracy"])
    assert results["mmmu_val"]["accuracy,none"] == pytest.approx(quick["mmmu_accuracy"])
    assert results["textvqa_val"]["accuracy,none"] == pytest.approx(quick["textvqa_accuracy"])
    assert results["pope"]["accuracy,none"] >= 0.7 and results["pope"]["f1,none"] >= 0.7
    assert results["mmmu_val"]["accuracy,none"] >= 0.5
    assert results["textvqa_val"]["accuracy,none"] >= 0.9


def test_samples_hold_prompt_response_parsed_answer_and_score(teacher_run):
    out, result = teacher_run
    folder = out / "tiny-teacher"
    pope = read_samples(folder / "samples_pope.jsonl")
    assert len(pope) == LIMIT and [s["doc_id"] for s in pope] == list(range(LIMIT))
    assert pope[0]["prompt"] == "Is there a purple diamond in the image?" + SHORT_ANSWER
    for sample in pope:
        assert sample["parsed"] == sample["response"].lower().strip() and sample["category"] == "adversarial"
        assert sample["score"] == float(sample["parsed"] == sample["answer"])
    accuracy = json.loads((folder / "results.json").read_text())["results"]["pope"]["accuracy,none"]
    assert sum(s["score"] for s in pope) / LIMIT == pytest.approx(accuracy)

    mmmu = read_samples(folder / "samples_mmmu_val.jsonl")
    choice = [s for s in mmmu if s["question_type"] == "multiple-choice"]
    open_ = [s for s in mmmu if s["question_type"] == "open"]
    assert choice and open_
    assert all(s["prompt"].endswith(CHOICE_ANSWER) and "\nA. " in s["prompt"] and s["parsed"] in "ABCD" for s in choice)
    assert all(s["prompt"].endswith("\n" + SHORT_ANSWER) and isinstance(s["parsed"], list) for s in open_)
    assert any(s["score"] == 1.0 for s in open_)  # the list-based open check, not lmms-eval's always-0 bug

    textvqa = read_samples(folder / "samples_textvqa_val.jsonl")
    assert all(s["score"] == pytest.approx(vqa_accuracy(s["response"], s["answer"])) for s in textvqa)
    assert all(len(s["answer"]) == 10 and "Reference OCR token" not in s["prompt"] for s in textvqa)

    choices = read_samples(folder / "samples_world_choice.jsonl")
    assert [len(s["response"]) for s in choices] == [len(d["choices"]) for d in TEXT_DOCS]
    assert "tiny-teacher generating pope" in result.stdout and "world_choice" in result.stdout  # progress bars


def test_teacher_and_hybrid_side_by_side_with_difference(env, hybrid, tmp_path):
    out = tmp_path / "out"
    result = evaluate(env, "--model", TEACHER, "--model", hybrid, "--tasks", "pope", "--limit", 6,
                      "--batch-size", 6, "--device", "cpu", "--output", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["tiny-teacher", "hybrid"]
    rows = {(row["task"], row["metric"]): row for row in summary["rows"]}
    for row in rows.values():
        values = row["values"]
        assert row["difference"]["hybrid"] == pytest.approx(values["hybrid"] - values["tiny-teacher"])
    accuracy = rows[("pope", "accuracy")]
    assert accuracy["values"]["tiny-teacher"] > 0.5 and accuracy["difference"]["hybrid"] < 0  # not yet distilled
    assert "Δ hybrid" in result.stdout and f"{accuracy['difference']['hybrid']:+.4f}" in result.stdout
    info = json.loads((out / "hybrid" / "results.json").read_text())["config"]
    assert info["matvlm_hybrid"]["layers"] == [0, 4] and info["model"] == str(hybrid)
    assert len(read_samples(out / "hybrid" / "samples_pope.jsonl")) == 6


def test_data_dir_with_hub_parquet_and_save_to_disk_copies(env, teacher_run, world, tmp_path, cli, monkeypatch):
    """The same rows, laid out three ways and passed through a recipe file, give the same answers."""
    import datasets

    def from_parquet(name):
        return datasets.Dataset.from_parquet(str(world / name), cache_dir=str(tmp_path / "hf"))

    data = tmp_path / "data"
    (data / "pope").mkdir(parents=True)
    shutil.copy(world / "pope/data/test-00000-of-00001.parquet", data / "pope" / "pope.parquet")  # flat hub copy
    mmmu = datasets.DatasetDict({"validation": from_parquet("mmmu/data/validation-00000-of-00001.parquet")})
    mmmu.save_to_disk(str(data / "mmmu"))  # a DatasetDict
    from_parquet("textvqa/data/validation-00000-of-00001.parquet").save_to_disk(str(data / "textvqa"))  # a Dataset
    recipe = tmp_path / "evaluate.yaml"
    recipe.write_text(yaml.safe_dump({"tasks": ["pope", "mmmu", "textvqa"], "data_dir": str(data), "limit": 99,
                                      "batch_size": 4, "device": "cpu"}))
    in_this_process(env, monkeypatch)
    result = cli("evaluate", recipe, "--limit", 4, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for task in ("pope", "mmmu_val", "textvqa_val"):
        ours = read_samples(tmp_path / "out" / "tiny-teacher" / f"samples_{task}.jsonl")
        reference = read_samples(teacher_run[0] / "tiny-teacher" / f"samples_{task}.jsonl")[:4]
        assert [(s["prompt"], s["response"], s["score"]) for s in ours] == [
            (s["prompt"], s["response"], s["score"]) for s in reference]
    config = json.loads((tmp_path / "out" / "tiny-teacher" / "results.json").read_text())["config"]
    assert config["limit"] == 4 and config["matvlm"]["data_dir"] == str(data)


def test_missing_dataset_is_one_line_naming_the_folder(env, tmp_path, cli, monkeypatch):
    in_this_process(env, monkeypatch)
    result = cli("evaluate", "--data-dir", tmp_path, "--tasks", "textvqa", "--output", tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'textvqa'}: no textvqa data" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was evaluated


@pytest.mark.parametrize("case", ["missing column", "wrong type", "empty cells", "bad value", "not parquet"])
def test_malformed_dataset_names_file_and_column(world, tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.data import load_benchmark

    table = pq.read_table(world / "pope/data/test-00000-of-00001.parquet")
    answers = table.column("answer").to_pylist()
    broken, expected = {
        "missing column": (table.drop(["category"]), "column 'category' is missing"),
        "wrong type": (table.set_column(5, "image", pa.array(range(table.num_rows))), "column 'image' must hold images"),
        "empty cells": (table.set_column(3, "answer", pa.array([None] * 3 + answers[3:])), "column 'answer' is empty in 3 rows"),
        "bad value": (table.set_column(3, "answer", pa.array(answers[:7] + ["maybe"] + answers[8:])),
                      "column 'answer' must be one of yes, no; row 7 has 'maybe'"),
        "not parquet": (None, "not a readable parquet file"),
    }[case]
    path = tmp_path / "pope" / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    if broken is None:
        path.write_text("not parquet")
    else:
        pq.write_table(broken, path)
    with pytest.raises(MatvlmError) as error:
        load_benchmark("pope", tmp_path)
    assert str(error.value).startswith(f"{path}: {expected}") and "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["unparsable options", "empty answer list"])
def test_rows_that_cannot_be_scored_are_named_before_any_model_loads(world, tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.data import load_benchmark

    benchmark, column, row = {"unparsable options": ("mmmu", "options", 2), "empty answer list": ("textvqa", "answers", 1)}[case]
    source = next((world / benchmark / "data").glob("*.parquet"))
    table = pq.read_table(source)
    values = table.column(column).to_pylist()
    values[row] = "['A', 'B'" if column == "options" else []
    path = tmp_path / benchmark / "data" / source.name
    path.parent.mkdir(parents=True)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type)), path)
    with pytest.raises(MatvlmError) as error:
        load_benchmark(benchmark, tmp_path)
    assert str(error.value).startswith(f"{path}: column '{column}'") and f"row {row}" in str(error.value)


def test_broken_images_are_named_by_row_not_by_a_bytesio(world, tmp_path):
    """Documents carry the encoded image, decoded by the task's hook: a broken or huge one names its row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_errors import bomb_png

    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.data import load_benchmark
    from matvlm_cli.evaluate.tasks import utils

    source = world / "pope/data/test-00000-of-00001.parquet"
    table = pq.read_table(source)
    images = table.column("image").to_pylist()
    images[1], images[2] = {"bytes": b"not an image", "path": None}, {"bytes": bomb_png(), "path": None}
    path = tmp_path / "pope" / "data" / source.name
    path.parent.mkdir(parents=True)
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, table.schema.field("image").type)), path)
    docs = load_benchmark("pope", tmp_path)["test"]
    assert utils.pope_doc_to_visual(docs[0])[0].mode == "RGB"
    for row, reason in ((1, "not a recognised image format"), (2, "decompression bomb")):
        with pytest.raises(MatvlmError) as error:
            utils.pope_doc_to_visual(docs[row])
        message = str(error.value)
        assert message.startswith(f"POPE question {docs[row]['question_id']}: cannot be read as an image")
        assert reason in message and "BytesIO" not in message


@pytest.mark.parametrize("content,message", [("task: [broken\n", "not valid YAML"), ("task: x\nnot_a_key: 1\n", "not_a_key")])
def test_a_broken_task_yaml_is_one_line(env, tmp_path, content, message):
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.run import run_evaluate
    from matvlm_cli.recipes import EvaluateRecipe

    task = tmp_path / "task.yaml"
    task.write_text(content)
    with pytest.raises(MatvlmError) as error:
        run_evaluate(EvaluateRecipe(tasks=[str(task)], device="cpu", output=str(tmp_path / "out")))
    assert str(error.value).startswith(f"task {task}: ") and message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_unknown_task_is_one_line_with_a_suggestion(env, tmp_path, cli, monkeypatch):
    in_this_process(env, monkeypatch)
    result = cli("evaluate", "--tasks", "pope,textvqa_vall", "--output", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown task 'textvqa_vall'" in result.stderr and "did you mean textvqa_val" in result.stderr


def test_shipped_evaluate_recipe_validates():
    from matvlm_cli.recipes import EvaluateRecipe, load_recipe

    recipe = load_recipe(EvaluateRecipe, Path(__file__).parents[1] / "recipes" / "evaluate-tiny.yaml", {"limit": 5})
    assert recipe.models == ["matvlm_cli/presets/tiny-teacher", "runs/tiny-hybrid-0.25"] and recipe.limit == 5


def test_task_aliases_and_ocr():
    from matvlm_cli.errors import MatvlmError
    from matvlm_cli.evaluate.run import task_names
    from matvlm_cli.recipes import EvaluateRecipe

    assert task_names(EvaluateRecipe(tasks=["pope", "mmmu", "textvqa", "mmmu_val"])) == ["pope", "mmmu_val", "textvqa_val"]
    assert task_names(EvaluateRecipe(tasks=["textvqa", "arc_easy"], ocr=True)) == ["textvqa_val_ocr", "arc_easy"]
    with pytest.raises(MatvlmError, match="--ocr"):
        task_names(EvaluateRecipe(tasks=["pope"], ocr=True))


def test_ocr_prompt_carries_the_reference_tokens():
    from matvlm_cli.evaluate.tasks import utils

    doc = {"question": "what is WRITTEN here?", "ocr_tokens": ["HAT", "42"]}
    assert utils.textvqa_doc_to_text_ocr(doc) == "What is written here?\nReference OCR token: HAT, 42" + SHORT_ANSWER
    assert utils.textvqa_doc_to_text(doc) == "What is written here?" + SHORT_ANSWER


def _requests(max_gen_toks: int):
    """Image requests of different lengths from two tasks, as lm-eval builds them."""
    from lm_eval.api.instance import Instance

    from matvlm_cli.evaluate.data import load_benchmark
    from matvlm_cli.evaluate.tasks import utils

    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    requests = []
    for task, benchmark, hooks in (("pope", "pope", ("pope_doc_to_text", "pope_doc_to_visual")),
                                   ("mmmu_val", "mmmu", ("mmmu_doc_to_text", "mmmu_doc_to_visual"))):
        docs = next(iter(load_benchmark(benchmark).values())).select(range(3))
        text, visual = (getattr(utils, name) for name in hooks)
        for i, doc in enumerate(docs):
            arguments = (text(doc), gen_kwargs, {"visual": visual(doc)})
            requests.append(Instance("generate_until", doc, arguments, idx=0, metadata=(task, i, 1)))
    return requests


@pytest.mark.parametrize("which", ["teacher", "hybrid"])
def test_batched_left_padded_generation_equals_one_by_one(env, world, hybrid, which, monkeypatch):
    """Longest-first batches with left padding, original order restored: the same answers as batch size 1."""
    from matvlm_cli.evaluate.model import MatvlmLM

    monkeypatch.setenv("MATVLM_CACHE", env["MATVLM_CACHE"])
    requests = _requests(max_gen_toks=16)
    model = MatvlmLM(TEACHER if which == "teacher" else hybrid, which, batch_size=1, device="cpu")
    one_by_one = model.generate_until(requests)
    model.batch_size = 6
    assert model.generate_until(requests) == one_by_one
    if which == "teacher":
        assert one_by_one[:2] == ["yes", "no"]  # in request order (the rows' gold answers)


def test_loglikelihood_matches_a_direct_forward():
    import torch
    from lm_eval.api.instance import Instance

    from matvlm_cli.evaluate.model import MatvlmLM

    model = MatvlmLM(TEACHER, "teacher", batch_size=4, device="cpu")
    pairs = [("USER: Is there a red circle? ASSISTANT:", " yes"), ("USER: What shape is it? ASSISTANT:", " star"),
             ("", "a red circle")]
    requests = [Instance("loglikelihood", {}, pair, idx=0, metadata=("t", i, 1)) for i, pair in enumerate(pairs)]
    scores = model.loglikelihood(requests)
    for (context, continuation), (logprob, _) in zip(pairs, scores):
        context_ids, continuation_ids = model._encode_pair(context, continuation)
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logits = model.model(input_ids=ids).logits[0].log_softmax(-1)
        expected = sum(logits[len(context_ids) - 1 + i, token].item() for i, token in enumerate(continuation_ids))
        assert logprob == pytest.approx(expected, abs=1e-4)
    rolling = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("a red circle",), 0, ("t", 0, 1))])
    assert rolling[0] == pytest.approx(scores[2][0], abs=1e-4)  # one window: the same as an empty context
    with pytest.raises(NotImplementedError, match="text only"):
        model.loglikelihood([Instance("loglikelihood", {}, ("a", " b", {"visual": []}), 0, ("t", 0, 1))])
