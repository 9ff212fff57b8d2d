"""What `matvlm evaluate` leaves behind: results.json and samples_<task>.jsonl per model (written
atomically), and the side-by-side table of every model's metrics with the difference to the first."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ..atomic import write_atomic

Row = tuple[str, str]  # (task, metric)


def _json(value, indent: int | None = None) -> str:
    """JSON as lm-eval writes it: what json cannot encode (numpy numbers, sets, images) is converted."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(value, default=handle_non_serializable, ensure_ascii=False, indent=indent)


def sample_line(sample: dict) -> dict:
    """One line of samples_<task>.jsonl: the prompt, the response, and for matvlm's tasks the record
    their process_results made (parsed answer, gold answer, score); for other tasks the target and the
    per-document metric values."""
    responses = sample["filtered_resps"]
    line = {
        "doc_id": sample["doc_id"],
        "prompt": sample["arguments"][0][0],
        "response": responses[0] if len(responses) == 1 else responses,
    }
    values = {name: sample[name] for name in sample["metrics"]}
    record = next((value for value in values.values() if isinstance(value, dict)), None)
    if record is not None:
        line.update({key: value for key, value in record.items() if key != "response"})
    else:
        line.update({"target": sample["target"], **values})
    return line


def write_run(directory: Path, results: dict) -> None:
    """results.json (lm-eval's layout; `config` carries the model's info) and one samples file per task."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", {}) or {}
    write_atomic(directory / "results.json", _json(results, indent=2) + "\n")
    for task, task_samples in samples.items():
        write_atomic(directory / f"samples_{task}.jsonl", "".join(_json(sample_line(s)) + "\n" for s in task_samples))


def _leaves(value, path: str = ""):
    """(path, number) for a metric value; breakdowns (dicts) become one entry per number, counts left out."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key != "num":
                yield from _leaves(inner, f"{path}/{key}" if path else str(key))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def metric_values(results: dict, task_order: list[str]) -> dict[Row, float]:
    """{(task, metric): value} from lm-eval's results, standard errors and bookkeeping keys left out;
    tasks in the order asked for, then any others (a group's subtasks) in lm-eval's order."""
    values: dict[Row, float] = {}
    tasks = sorted(results["results"], key=lambda task: task_order.index(task) if task in task_order else len(task_order))
    for task in tasks:
        entry = results["results"][task]
        for key, value in entry.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            name = metric if filter_name == "none" else f"{metric} [{filter_name}]"
            for path, number in _leaves(value):
                values[(task, f"{name}/{path}" if path else name)] = number
    return values


def comparison(labels: list[str], values: list[dict[Row, float]]) -> list[dict]:
    """Rows in first-seen order; `difference` holds every later model minus the first."""
    rows = list(dict.fromkeys(row for model in values for row in model))
    table = []
    for task, metric in rows:
        per_model = {label: model.get((task, metric)) for label, model in zip(labels, values)}
        first = per_model[labels[0]]
        difference = {
            label: (value - first if value is not None and first is not None else None)
            for label, value in list(per_model.items())[1:]
        }
        table.append({"task": task, "metric": metric, "values": per_model, "difference": difference})
    return table


def render(rows: list[dict], labels: list[str], counts: dict[str, int]) -> Table:
    table = Table(title="matvlm evaluate" + (f": difference against {labels[0]}" if len(labels) > 1 else ""))
    table.add_column("task")
    table.add_column("n", justify="right")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for label in labels[1:]:
        table.add_column(f"Δ {label}", justify="right")
    previous_task = None
    for row in rows:
        task = row["task"] if row["task"] != previous_task else ""
        count = str(counts.get(row["task"], "")) if task else ""
        previous_task = row["task"]
        cells = [_number(row["values"][label]) for label in labels]
        cells += [_number(row["difference"][label], signed=True) for label in labels[1:]]
        table.add_row(task, count, row["metric"], *cells)
    return table


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
