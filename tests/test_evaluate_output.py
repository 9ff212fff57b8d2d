"""What `matvlm evaluate` shows and writes, on real lm-eval runs of the embedded teacher and a hybrid kept in
folders with long names: a headline table that fits 80 columns with every number whole, report.md with
the per-category tables, lm-eval's and transformers' log lines in evaluate.log, and on the terminal one
rich progress bar: no tqdm bar of lm-eval's reaches stderr."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from matvlm_cli.paths import default_teacher_dir

LIMIT = 6
LONG = "a-rather-long-experiment-folder-name/llava-onevision-qwen2-0.5b-si"
TEACHER_LABEL = "llava-onevision-qwen2-0.5b-si-teacher-reference-copy-from-the-hub"
HYBRID_LABEL = "llava-onevision-qwen2-0.5b-si-hybrid-0.25-distilled-stage2-final"
TQDM_BAR = re.compile(r"\d+%\||it/s\]|s/it\]")  # "100%|██████████| 4/4 [00:00<00:00, 3235.10it/s]"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "MATVLM_CACHE": str(cache), "HF_DATASETS_CACHE": str(cache / "hf"), "HF_HUB_OFFLINE": "1",
            "COLUMNS": "80", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The embedded teacher and a fresh hybrid of it, each in a folder with a long path and a long name."""
    from matvlm_cli.convert import run_convert
    from matvlm_cli.recipes import ConvertRecipe

    root = tmp_path_factory.mktemp("models") / LONG
    teacher = shutil.copytree(default_teacher_dir(), root / TEACHER_LABEL)
    hybrid = run_convert(ConvertRecipe(ratio=0.25, output=str(root / HYBRID_LABEL)))
    return teacher, hybrid


@pytest.fixture(scope="module")
def run(env, models, tmp_path_factory):
    """`matvlm evaluate` in a subprocess whose stdout is a pipe 80 columns wide, as in a CI log."""
    out = tmp_path_factory.mktemp("evaluate") / "out"
    command = [sys.executable, "-m", "matvlm_cli", "evaluate", "-m", models[0], "-m", models[1],
               "--tasks", "pope,mmmu,textvqa", "--limit", str(LIMIT), "--batch-size", "6", "--device", "cpu",
               "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return out, result


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def value(out: Path, label: str, task: str, metric: str) -> tuple[float, float | None]:
    row = next(r for r in summary(out)["rows"] if (r["task"], r["metric"]) == (task, metric))
    return row["values"][label], row["difference"].get(label)


def test_headline_table_fits_80_columns_with_every_number_whole(run):
    from rich.console import Console

    from matvlm_cli.evaluate import report
    from matvlm_cli.evaluate.progress import short_name

    out, _ = run
    rows, labels = summary(out)["rows"], [model["label"] for model in summary(out)["models"]]
    assert labels == [TEACHER_LABEL, HYBRID_LABEL]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(report.headline(rows, labels, ["pope", "mmmu_val", "textvqa_val"], {"pope": LIMIT}))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    columns = [("pope", "accuracy"), ("pope", "f1"), ("mmmu_val", "accuracy"), ("textvqa_val", "accuracy")]

    def row(name: str) -> list[str]:
        (line,) = [line for line in lines if line.strip().startswith(name + " ")]
        assert "…" in line[:32] and "…" not in line[32:]  # the name gives way, cut in the middle; numbers whole
        return line[32:].split()

    assert row(short_name(TEACHER_LABEL)) == [f"{value(out, TEACHER_LABEL, *c)[0]:.4f}" for c in columns]
    assert row(short_name(HYBRID_LABEL)) == [f"{value(out, HYBRID_LABEL, *c)[0]:.4f}" for c in columns]
    assert row(f"Δ {short_name(HYBRID_LABEL)}") == [f"{value(out, HYBRID_LABEL, *c)[1]:+.4f}" for c in columns]
    assert short_name(HYBRID_LABEL).startswith("llava-onevi") and short_name(HYBRID_LABEL).endswith("-final")


def test_terminal_output_is_the_headline_table_and_the_files(run):
    from matvlm_cli.evaluate.progress import short_name

    out, result = run
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80, result.stdout
    assert "categories" not in result.stdout and "subjects" not in result.stdout  # those are in report.md
    assert "POPE" in result.stdout and "MMMU" in result.stdout and "TextVQA" in result.stdout
    accuracy = f"{value(out, HYBRID_LABEL, 'mmmu_val', 'accuracy')[0]:.4f}"
    assert any(line.strip().startswith(short_name(HYBRID_LABEL)) and accuracy in line for line in lines)
    for path in (out / "report.md", out / "summary.json", out / "evaluate.log", f"{out / HYBRID_LABEL}/"):
        assert str(path) in "".join(line.strip() for line in lines)  # long paths fold onto the next lines
    documents = 2 * 3 * LIMIT  # models × tasks × documents
    assert "2 models evaluated" in result.stdout and f"{documents}/{documents} documents" in result.stdout


def test_every_file_is_written_beside_the_report(run):
    out, _ = run
    assert {path.name for path in out.iterdir()} == {"summary.json", "report.md", "evaluate.log", TEACHER_LABEL, HYBRID_LABEL}
    for label in (TEACHER_LABEL, HYBRID_LABEL):
        assert {path.name for path in (out / label).iterdir()} == {
            "results.json", "samples_pope.jsonl", "samples_mmmu_val.jsonl", "samples_textvqa_val.jsonl"}


def test_report_md_holds_the_per_category_tables(run):
    out, _ = run
    text = (out / "report.md").read_text()
    results = json.loads((out / HYBRID_LABEL / "results.json").read_text())["results"]
    assert "## pope: categories" in text and "## mmmu_val: subjects" in text and "## mmmu_val: domains" in text
    assert f"| categories | metric | {TEACHER_LABEL} | {HYBRID_LABEL} | Δ {HYBRID_LABEL} |" in text
    for category, metrics in results["pope"]["categories,none"].items():
        for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            teacher, difference = value(out, TEACHER_LABEL, "pope", f"categories/{category}/{metric}")
            hybrid = f"{metrics[metric]:.4f} | {value(out, HYBRID_LABEL, 'pope', f'categories/{category}/{metric}')[1]:+.4f}"
            assert re.search(rf"\| ({re.escape(category)})? \| {metric} \| {teacher:.4f} \| {re.escape(hybrid)} \|", text)
    for subject, entry in results["mmmu_val"]["subjects,none"].items():
        assert re.search(rf"\| {re.escape(subject)} \| accuracy \| [0-9.]+ \| {entry['accuracy']:.4f} \|", text)
    assert f"## textvqa_val ({LIMIT} documents)" in text


def test_no_tqdm_bar_reaches_stderr_and_the_log_has_lm_evals_lines(run):
    out, result = run
    assert not TQDM_BAR.search(result.stderr) and "\r" not in result.stderr, result.stderr
    log = (out / "evaluate.log").read_text()
    assert "lm_eval" in log and "Building contexts for pope" in log and "Running generate_until requests" in log
    assert f"{HYBRID_LABEL} generating pope: {LIMIT} documents" in log


def test_on_a_terminal_one_bar_and_nothing_else_reaches_it(env, models, tmp_path, capfd, monkeypatch):
    """In process, on a console that is a terminal: one bar (no line per task), no tqdm on the real stderr,
    and the loggers and warnings as they were afterwards."""
    import warnings

    import datasets  # noqa: F401 - its logger is set up on import, before the snapshot below
    from rich.console import Console
    from transformers.utils import logging as transformers_logging

    from matvlm_cli.evaluate.run import run_evaluate
    from matvlm_cli.recipes import EvaluateRecipe

    for name in ("MATVLM_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    before = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level)
              for name in ("lm_eval", "transformers", "datasets")}
    show_warning, bars = warnings.showwarning, transformers_logging.is_progress_bar_enabled()
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80, color_system=None)
    run_evaluate(EvaluateRecipe(models=[str(models[1])], tasks=["pope"], limit=3, batch_size=3, device="cpu",
                                output=str(tmp_path / "out")), console)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "documents" in shown and "generating pope:" not in shown  # the bar, not the lines of a log
    assert not TQDM_BAR.search(capfd.readouterr().err)
    assert {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in before} == before
    assert warnings.showwarning is show_warning and transformers_logging.is_progress_bar_enabled() == bars
