"""The one progress bar of `matvlm evaluate`: the documents of every model on every task, with lm-eval's
own tqdm bars folded in.

lm-eval opens a tqdm bar per task while it builds the prompts; inside an evaluation those calls come here
instead, where they show in the bar's description and count the documents a model has to answer (the same
number for every model, so the first model's count sizes the whole bar). The model then reports its
requests as it answers them: a document is done once the last of its requests (a multiple-choice document
has one per choice) has been answered.

A live bar needs a terminal. Where the console is a file or a pipe (a log, CI), each finished task is
printed as one line instead, so that a long run shows its progress there too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger(__name__)

DocumentKey = tuple[str, int]  # (task name, document id)


def short_name(name: str, width: int = 28) -> str:
    """`name` cut in the middle to at most `width` characters: both its start and its end tell models apart
    (llava-onevision-…-hybrid-0.25)."""
    if len(name) <= width:
        return name
    tail = (width - 1) // 2
    return f"{name[: width - 1 - tail]}…{name[-tail:]}"


class EvaluationProgress:
    """One rich bar over models × documents; use as a context manager around the whole evaluation."""

    def __init__(self, console: Console, models: int) -> None:
        self.console, self.models = console, models
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
            TimeElapsedColumn(), console=console,
        )
        self.bar = self.progress.add_task("", total=None)
        self.label = ""
        self.documents_per_model = 0  # counted while the first model's prompts are built
        self.model_index = 0

    def __enter__(self) -> EvaluationProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._describe(f"{self.models} model{'s' if self.models > 1 else ''} evaluated")
        self.progress.stop()

    def _describe(self, text: str) -> None:
        self.progress.update(self.bar, description=text)

    def start_model(self, label: str) -> None:
        self.model_index += 1
        self.label = label
        self._describe(f"{short_name(label)}: loading")

    # ------------------------------------------------------------------------------ lm-eval's tqdm bars

    @contextlib.contextmanager
    def folding_tqdm(self):
        """While lm-eval runs: its prompt-building bars count documents here, and its other bars (the
        base class's request loops) draw nothing."""
        import lm_eval.api.model
        import lm_eval.api.task

        originals = lm_eval.api.task.tqdm, lm_eval.api.model.tqdm
        lm_eval.api.task.tqdm, lm_eval.api.model.tqdm = self._building_prompts, _silent_tqdm
        try:
            yield
        finally:
            lm_eval.api.task.tqdm, lm_eval.api.model.tqdm = originals

    def _building_prompts(self, iterable: Iterable, total: int | None = None, **_) -> Iterable:
        self._describe(f"{short_name(self.label)}: building prompts")
        if self.model_index == 1:
            self.documents_per_model += total if total is not None else 0
        return iterable

    # ------------------------------------------------------------------------------- the model's requests

    def track(self, verb: str, keys: list[DocumentKey]) -> Callable[[Iterable[DocumentKey]], None]:
        """For one call of the model (all its requests of one type): returns `advance(keys)`, to be called
        with the documents of each batch of requests answered."""
        if self.model_index == 1 and self.documents_per_model:  # every prompt is built before the first call
            self.progress.update(self.bar, total=self.documents_per_model * self.models)
        tasks = list(dict.fromkeys(task for task, _ in keys))
        self._describe(f"{short_name(self.label)} {verb}")
        requests_left = Counter(keys)
        documents_left = Counter(task for task, _ in requests_left)
        documents = dict(documents_left)
        start = time.perf_counter()

        def advance(answered: Iterable[DocumentKey]) -> None:
            for key in answered:
                requests_left[key] -= 1
                if requests_left[key]:
                    continue
                self.progress.advance(self.bar)
                documents_left[key[0]] -= 1
                if not documents_left[key[0]]:
                    self._task_done(verb, key[0], documents[key[0]], time.perf_counter() - start)

        logger.info("%s %s %s: %d requests", self.label, verb, ", ".join(tasks), len(keys))
        return advance

    def _task_done(self, verb: str, task: str, documents: int, seconds: float) -> None:
        line = f"{self.label} {verb} {task}: {documents} documents in {seconds:.0f} s"
        logger.info(line)
        if not self.console.is_terminal:  # no live bar there: one line per finished task instead
            self.console.print(line, markup=False, highlight=False)


def _silent_tqdm(iterable: Iterable | None = None, *args, **kwargs) -> Iterable:
    return iterable if iterable is not None else []
