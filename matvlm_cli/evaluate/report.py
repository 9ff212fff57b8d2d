"""What `matvlm evaluate` leaves behind: results.json and samples_<task>.jsonl per model (written
atomically), the headline table for the terminal, and report.md with every model's metrics side by side
and each later model's difference to the first."""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.table import Table
from rich.text import Text

from ..atomic import write_atomic
from .progress import short_name

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


# The numbers each benchmark's papers quote; another task is headlined by its first metric.
HEADLINE_METRICS = {"pope": ("accuracy", "f1"), "mmmu_val": ("accuracy",), "textvqa_val": ("accuracy",),
                    "textvqa_val_ocr": ("accuracy",)}
TITLES = {"pope": "POPE", "mmmu_val": "MMMU", "textvqa_val": "TextVQA", "textvqa_val_ocr": "TextVQA+OCR"}


def headline_columns(rows: list[dict], tasks: list[str]) -> list[Row]:
    """(task, metric) of the headline table: per task its quoted metrics, or else its first one."""
    metrics: dict[str, list[str]] = {}
    for row in rows:
        metrics.setdefault(row["task"], []).append(row["metric"])
    columns = []
    for task in tasks:
        found = metrics.get(task, [])
        columns += [(task, metric) for metric in HEADLINE_METRICS.get(task, found[:1]) if metric in found]
    return columns


def headline(rows: list[dict], labels: list[str], tasks: list[str], counts: dict[str, int]) -> Table:
    """One row per model (and one with its difference to the first model under each later one), one
    column per headline metric: narrow enough for an 80-column terminal, names cut in the middle."""
    by_key = {(row["task"], row["metric"]): row for row in rows}
    columns = headline_columns(rows, tasks)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, caption=Text(_documents(counts, tasks)), caption_justify="left")
    table.add_column("model", overflow="ellipsis", no_wrap=True)
    for task, metric in columns:  # numbers whole, never cut: only the names give way
        table.add_column(Text(f"{TITLES.get(task, task)}\n{metric}"), justify="right", no_wrap=True, min_width=7)
    for index, label in enumerate(labels):
        values = [_number(by_key[column]["values"][label]) for column in columns]
        table.add_row(Text(short_name(label)), *values)
        if index:
            differences = [_number(by_key[column]["difference"][label], signed=True) for column in columns]
            table.add_row(Text(f"Δ {short_name(label)}"), *differences, style="dim")
    return table


def _documents(counts: dict[str, int], tasks: list[str]) -> str:
    asked = {task: counts[task] for task in tasks if task in counts}
    if not asked:
        return ""
    if len(set(asked.values())) == 1:
        return f"{next(iter(asked.values()))} documents per task"
    return "documents: " + ", ".join(f"{task} {n}" for task, n in asked.items())


def markdown(rows: list[dict], labels: list[str], counts: dict[str, int], models: list[Path]) -> str:
    """report.md: every metric of every task, one table per task and one per breakdown (POPE's
    categories, MMMU's subjects and domains), with each later model's difference to the first."""
    header = ["", *labels, *(f"Δ {label}" for label in labels[1:])]
    lines = ["# matvlm evaluate", ""]
    lines += [f"- `{label}`: {path}" for label, path in zip(labels, models)]
    sections: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        breakdown, slash, _ = row["metric"].partition("/")
        sections.setdefault((row["task"], breakdown if slash else ""), []).append(row)
    for (task, breakdown), section in sections.items():
        title = f"{task}: {breakdown}" if breakdown else f"{task} ({counts.get(task, '?')} documents)"
        names = [breakdown, "metric"] if breakdown else ["metric"]
        lines += ["", f"## {title}", "", _markdown_row([*names, *header[1:]]),
                  _markdown_row([*["---"] * len(names), *["---:"] * (len(header) - 1)])]
        previous = None
        for row in section:
            cells = [_number(row["values"][label]) for label in labels]
            cells += [_number(row["difference"][label], signed=True) for label in labels[1:]]
            if breakdown:  # categories/adversarial/f1: the category once, then its metrics
                category, _, metric = row["metric"].partition("/")[2].rpartition("/")
                cells = [category if category != previous else "", metric, *cells]
                previous = category
            else:
                cells = [row["metric"], *cells]
            lines.append(_markdown_row(cells))
    return "\n".join(lines) + "\n"


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
