"""The `evaluate` subcommand's engine: check everything, then run each model through lm-eval, then report.

Order matters for the user: task names, model directories and every dataset are checked before the
first model is loaded, so a typo or a bad parquet file is a one-line error in seconds, not after a
7B model has been read.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..atomic import check_output_dir, write_atomic
from ..choices import Device, choices
from ..errors import MatvlmError
from ..hybrid.checks import check_model
from ..hybrid.layouts import check_model_dir
from ..recipes import EvaluateRecipe
from . import report
from .logs import logs_to_file
from .progress import EvaluationProgress

TASKS_DIR = Path(__file__).parent / "tasks"
TASK_ALIASES = {"pope": "pope", "mmmu": "mmmu_val", "textvqa": "textvqa_val"}
OCR_VARIANTS = {"textvqa_val": "textvqa_val_ocr"}
DEVICES = choices(Device)
logger = logging.getLogger(__name__)


def check_recipe(recipe: EvaluateRecipe) -> None:
    if not recipe.tasks:
        raise MatvlmError("tasks: give at least one task, e.g. --tasks pope,mmmu,textvqa")
    if recipe.limit is not None and recipe.limit < 1:
        raise MatvlmError(f"limit: must be at least 1, got {recipe.limit}")
    if recipe.batch_size < 1:
        raise MatvlmError(f"batch_size: must be at least 1, got {recipe.batch_size}")
    if recipe.device not in DEVICES:
        raise MatvlmError(f"device: {recipe.device!r} is not one of {', '.join(DEVICES)}")
    if recipe.data_dir is not None and not Path(recipe.data_dir).is_dir():
        raise MatvlmError(f"{recipe.data_dir}: --data-dir is not a directory")
    check_output_dir(recipe.output, "--output", exists_ok=True)  # results are added to an existing folder


def task_names(recipe: EvaluateRecipe) -> list[str]:
    """Aliases resolved (pope, mmmu, textvqa), --ocr applied, duplicates dropped, order kept."""
    names = [TASK_ALIASES.get(name, name) for name in recipe.tasks]
    if recipe.ocr:
        if not any(name in OCR_VARIANTS for name in names):
            raise MatvlmError("--ocr adds OCR tokens to textvqa's prompt, but textvqa is not among the tasks")
        names = [OCR_VARIANTS.get(name, name) for name in names]
    return list(dict.fromkeys(names))


def model_labels(models: list[Path]) -> list[str]:
    """Directory names, made unique (they name the output folders and the table's columns)."""
    labels: list[str] = []
    for path in models:
        label, n = path.name, 1
        while label in labels:
            n += 1
            label = f"{path.name}-{n}"
        labels.append(label)
    return labels


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def task_manager(names: list[str], metadata: dict, console: Console):
    """matvlm's tasks, plus lm-eval's own only when another name is asked for (indexing those takes
    about ten seconds); a name that is neither is an error with suggestions."""
    from lm_eval.tasks import TaskManager

    ours = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    if all(name in ours.all_tasks or _is_task_file(name) for name in names):
        return ours
    with console.status("Indexing lm-eval's tasks"):
        full = TaskManager(include_path=str(TASKS_DIR), include_defaults=True, metadata=metadata)
    for name in names:
        if name not in full.all_tasks and not _is_task_file(name):
            close = difflib.get_close_matches(name, list(dict.fromkeys([*TASK_ALIASES, *full.all_tasks])), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise MatvlmError(
                f"unknown task {name!r}: not one of matvlm's ({', '.join(TASK_ALIASES)}, or "
                f"{', '.join(ours.all_tasks)}), an lm-eval task, group or tag, or a task YAML file{hint}"
            )
    return full


def load_tasks(manager, names: list[str]) -> None:
    """Build every task once, which reads and checks its data, so data problems surface before any
    model is loaded. matvlm's loaders raise MatvlmError themselves; other tasks' data must already be on
    disk (lm-eval reads it with `datasets`), and a failure to find it becomes a one-line error too."""
    import yaml

    for name in names:
        try:
            manager.load([name])
        except MatvlmError:
            raise
        except yaml.YAMLError as err:  # a task YAML given by path (or one it includes)
            mark = getattr(err, "problem_mark", None)
            where = f"{mark.name}:{mark.line + 1}" if mark is not None else name
            raise MatvlmError(f"task {name}: {where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
        except TypeError as err:  # lm-eval's TaskConfig(**yaml): a key it does not know
            if not _is_task_file(name):
                raise
            raise MatvlmError(f"task {name}: not an lm-eval task config ({err})") from None
        except (OSError, ValueError, KeyError) as err:  # datasets' not-found and offline errors are among these
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MatvlmError(f"task {name}: cannot be loaded: {first}") from None


@contextlib.contextmanager
def _quiet_git():
    """lm-eval records `git describe` of the working directory in results.json, and lets git print
    "fatal: not a git repository" on our stderr outside one. The same value, asked quietly."""
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash():
        try:
            return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True).stdout.strip()
        except (subprocess.CalledProcessError, OSError):
            return get_commit_from_path(Path.cwd())

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def run_evaluate(recipe: EvaluateRecipe, console: Console | None = None) -> list[dict]:
    """Evaluate every model on every task; returns the comparison rows (also in summary.json)."""
    console = console or Console()
    check_recipe(recipe)
    names = task_names(recipe)
    if recipe.models:
        models = [check_model_dir(path) for path in recipe.models]
    else:
        from ..paths import default_teacher_dir

        models = [default_teacher_dir()]
        console.print(f"No --model given: evaluating the embedded teacher at {models[0]}")
    labels = model_labels(models)
    ours = [name for name in names if (TASKS_DIR / f"{name}.yaml").is_file()]  # pope, mmmu, textvqa: image tasks
    import datasets

    from .data import synthetic_data_dir

    datasets.disable_progress_bars()
    output = Path(recipe.output)
    with logs_to_file() as log:  # lm-eval's and transformers' log lines: into evaluate.log
        with console.status("Checking the models"):
            for path in models:  # all of them: a broken second model must not cost the first one's run
                check_model(path, images_for=f"the image task {ours[0]}" if ours else None)
        data_dir = Path(recipe.data_dir) if recipe.data_dir else None
        if data_dir is None and ours:
            with console.status("Writing the embedded synthetic benchmark sets"):
                data_dir = synthetic_data_dir()
        metadata = {"matvlm_data_dir": str(data_dir.resolve())} if data_dir else {}
        manager = task_manager(names, metadata, console)
        load_tasks(manager, names)
        output.mkdir(parents=True, exist_ok=True)  # only now: a run stopped by a check leaves no folder
        log.open(output / "evaluate.log")
        all_values, counts, group_subtasks = _evaluate_models(recipe, models, labels, names, manager, data_dir, console)

    rows = report.comparison(labels, all_values)
    summary = {"models": [{"label": label, "path": str(path)} for label, path in zip(labels, models)], "rows": rows}
    write_atomic(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(output / "report.md", report.markdown(rows, labels, counts, models))
    subtasks = {task for tasks in group_subtasks.values() for task in tasks}  # a group's are in report.md
    tasks = [task for task in dict.fromkeys(row["task"] for row in rows) if task not in subtasks]
    console.print(report.headline(rows, labels, tasks, counts))
    _print_files(console, output, labels)
    return rows


def _evaluate_models(recipe: EvaluateRecipe, models: list[Path], labels: list[str], names: list[str], manager,
                     data_dir: Path | None, console: Console) -> tuple[list[dict], dict[str, int], dict]:
    """Each model through lm-eval in turn, under one progress bar; each model's results written as soon as
    it is done. Returns every model's metric values, the documents per task and lm-eval's task groups."""
    from lm_eval import simple_evaluate  # only now: torch, transformers and the model code

    from .model import MatvlmLM

    output = Path(recipe.output)
    all_values, counts, group_subtasks = [], {}, {}
    with EvaluationProgress(console, len(models)) as progress, progress.folding_tqdm():
        for path, label in zip(models, labels):
            start = time.perf_counter()
            progress.start_model(label)
            model = MatvlmLM(path, label, batch_size=recipe.batch_size, device=recipe.device, progress=progress)
            with _quiet_git():
                results = simple_evaluate(
                    model=model, tasks=names, task_manager=manager, limit=recipe.limit,
                    batch_size=recipe.batch_size, device=str(model.device),  # recorded in results.json's config
                )
            del model
            results["config"]["matvlm"] = {"tasks": names, "data_dir": str(data_dir) if data_dir else None, "ocr": recipe.ocr}
            report.write_run(output / label, results)
            logger.info("%s: %.0f s, results in %s", label, time.perf_counter() - start, output / label)
            all_values.append(report.metric_values(results, names))
            counts = counts or {task: n["effective"] for task, n in results["n-samples"].items()}
            group_subtasks = group_subtasks or results.get("group_subtasks", {})
    return all_values, counts, group_subtasks


def _print_files(console: Console, output: Path, labels: list[str]) -> None:
    files = Table.grid(padding=(0, 2))
    files.add_column(no_wrap=True)
    files.add_column(overflow="fold")
    files.add_row("Every metric, per category", Text(str(output / "report.md")))
    files.add_row("Side by side, as JSON", Text(str(output / "summary.json")))
    files.add_row("Log of lm-eval and transformers", Text(str(output / "evaluate.log")))
    for index, label in enumerate(labels):
        files.add_row("Results and samples per model" if index == 0 else "", Text(f"{output / label}/"))
    console.print(files)
