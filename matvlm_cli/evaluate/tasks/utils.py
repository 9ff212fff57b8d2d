"""Hooks of the lm-eval tasks in this folder (pope, mmmu_val, textvqa_val, textvqa_val_ocr): data loading,
prompts, images, per-document scoring and aggregation, as lmms-eval's tasks define them (docs/evaluate.md).

Scoring lives in matvlm_cli.evaluate.metrics; this module only wires it into lm-eval. `process_results`
returns one record per document (the parsed answer and the score, plus what the aggregations need) under
every metric name of the task, so each aggregation sees the whole list of records: POPE's precision and
recall, and MMMU's per-subject accuracy, are not means of per-document numbers. The same records become
the lines of samples_<task>.jsonl.
"""

from __future__ import annotations

import ast
import re

from matvlm_cli.errors import MatvlmError
from matvlm_cli.evaluate import data, metrics
from matvlm_cli.world.questions import mmmu_prompt, pope_prompt, textvqa_prompt


def load_benchmark(benchmark, matvlm_data_dir=None, extra_columns=(), **_task_metadata):
    """lm-eval's `custom_dataset` hook: `dataset_kwargs` name the benchmark, the TaskManager's metadata the
    folder (`matvlm evaluate --data-dir`, or lm_eval --metadata '{"matvlm_data_dir": ...}')."""
    return data.load_benchmark(benchmark, matvlm_data_dir, extra_columns)


def mean_score(records):
    return sum(record["score"] for record in records) / len(records) if records else 0.0


# ---------------------------------------------------------------------------------------------------- POPE


def pope_doc_to_text(doc):
    return pope_prompt(doc["question"])


def pope_doc_to_visual(doc):
    return [data.to_rgb(doc["image"], f"POPE question {doc['question_id']}")]


def pope_process_results(doc, results):
    response = results[0]
    parsed = response.lower().strip()  # lmms-eval's reading; the LLaVA script's is llava_parsed
    record = {
        "id": doc["question_id"], "category": doc["category"], "response": response, "parsed": parsed,
        "llava_parsed": metrics.llava_yes_no(response), "answer": doc["answer"],
        "score": float(parsed == doc["answer"].lower().strip()),
    }
    return dict.fromkeys(
        ("accuracy", "precision", "recall", "f1", "yes_ratio", "categories", "llava_f1", "llava_categories"), record
    )


def _pope_rows(records):
    return [(r["response"], r["answer"], r["category"]) for r in records]


def _pope_metric(score: str, key: str):
    """An lm-eval aggregation: one entry of `metrics.pope_lmms_eval` or `metrics.pope_llava_script`."""
    scorer = getattr(metrics, score)

    def aggregate(records):
        return scorer(_pope_rows(records))[key]

    return aggregate


# lmms-eval's metrics over all rows, and per category ({category: {accuracy, ..., num}}).
pope_accuracy = _pope_metric("pope_lmms_eval", "accuracy")
pope_precision = _pope_metric("pope_lmms_eval", "precision")
pope_recall = _pope_metric("pope_lmms_eval", "recall")
pope_f1 = _pope_metric("pope_lmms_eval", "f1")
pope_yes_ratio = _pope_metric("pope_lmms_eval", "yes_ratio")
pope_categories = _pope_metric("pope_lmms_eval", "categories")
# The LLaVA script's F1 averaged over the categories (the number papers report), and per category.
pope_llava_f1 = _pope_metric("pope_llava_script", "mean_f1")
pope_llava_categories = _pope_metric("pope_llava_script", "categories")


# ---------------------------------------------------------------------------------------------------- MMMU

_IMAGE_REFERENCE = re.compile(r"<image (\d+)>")


def _options(doc):
    return ast.literal_eval(doc["options"])


def _gold(answer):
    """An open question's gold may be a string holding a list of acceptable answers."""
    if answer.startswith("["):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(value, list):
            return [str(v) for v in value]
    return answer


def mmmu_doc_to_text(doc):
    return mmmu_prompt(doc["question"], _options(doc))


def mmmu_doc_to_visual(doc):
    """The images `<image k>` refers to in the question and options, each once, in order of mention."""
    numbers = dict.fromkeys(_IMAGE_REFERENCE.findall(doc["question"] + doc["options"]))
    images = []
    for k in numbers:
        image = doc.get(f"image_{k}")
        if image is None:
            raise MatvlmError(f"MMMU {doc['id']}: the question refers to <image {k}> but column 'image_{k}' is empty")
        images.append(data.to_rgb(image, f"MMMU {doc['id']} image_{k}"))
    return images


def mmmu_process_results(doc, results):
    response, options = results[0], _options(doc)
    if doc["question_type"] == "multiple-choice":
        parsed = metrics.parse_multi_choice(response, options)
    else:
        parsed = metrics.parse_open(response)
    correct = metrics.mmmu_score(doc["id"], doc["question_type"], _gold(doc["answer"]), response, options)
    record = {
        "id": doc["id"], "question_type": doc["question_type"], "parsed": parsed, "answer": doc["answer"],
        "score": float(correct),
    }
    return dict.fromkeys(("accuracy", "domains", "subjects"), record)


def _mmmu(records):
    return metrics.mmmu_aggregate((r["id"], r["score"] == 1.0) for r in records)


def mmmu_accuracy(records):
    return _mmmu(records)["accuracy"]


def mmmu_domains(records):
    return _mmmu(records)["domains"]


def mmmu_subjects(records):
    return _mmmu(records)["subjects"]


# ------------------------------------------------------------------------------------------------- TextVQA


def textvqa_doc_to_text(doc):
    return textvqa_prompt(doc["question"])


def textvqa_doc_to_text_ocr(doc):
    return textvqa_prompt(doc["question"], doc["ocr_tokens"])


def textvqa_doc_to_visual(doc):
    return [data.to_rgb(doc["image"], f"TextVQA question {doc['question_id']}")]


def textvqa_process_results(doc, results):
    response = results[0]
    record = {
        "id": doc["question_id"], "parsed": metrics.normalize_answer(response), "answer": doc["answers"],
        "score": metrics.vqa_accuracy(response, doc["answers"]),
    }
    return {"accuracy": record}
