"""Where the libraries' log lines go during `matvlm evaluate`: into `<output>/evaluate.log`, not the terminal.

lm-eval, transformers and datasets log through their own loggers (transformers and datasets with handlers
of their own on stderr), and torch and transformers also speak through `warnings`. During an evaluation
all of that is written to the log file, with lm-eval at INFO so that the file tells what it did (which
tasks, which requests, how many). Records that come before the output folder exists (while the tasks are
loaded) are kept and written once it does: a run that stops at a check leaves no folder behind.
matvlm's own warnings still reach the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from ..errors import MatvlmWarning

LIBRARIES = ("lm_eval", "transformers", "datasets", "huggingface_hub", "accelerate", "py.warnings", "matvlm_cli.evaluate")
INFO_LEVEL = ("lm_eval", "matvlm_cli.evaluate")  # theirs say what was run; the others' INFO is noise
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class LogFile(logging.Handler):
    """Keeps records in memory until `open(path)`, then writes them and every later one there."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        self.pending: list[logging.LogRecord] = []
        self.stream = None
        self.path: Path | None = None

    def open(self, path: Path) -> None:
        self.path = path
        self.stream = open(path, "w", encoding="utf-8")  # this run's, as summary.json and report.md are
        for record in self.pending:
            self.emit(record)
        self.pending.clear()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.pending.append(record)
            return
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never end the run
            self.handleError(record)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


@contextlib.contextmanager
def logs_to_file():
    """Yields the LogFile handler every library logs to until the block ends; call its `open` once the
    output folder exists. Loggers, transformers' progress bars and warnings are restored afterwards."""
    from transformers.utils import logging as transformers_logging

    handler = LogFile()
    saved = {}
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate, logger.level)
        logger.handlers, logger.propagate = [handler], False
        if name in INFO_LEVEL:
            logger.setLevel(logging.INFO)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Loading checkpoint shards" and the like
    show_warning = warnings.showwarning

    def to_log(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MatvlmWarning):
            show_warning(message, category, filename, lineno, file, line)
        else:
            logging.getLogger("py.warnings").warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    warnings.showwarning = to_log
    try:
        yield handler
    finally:
        warnings.showwarning = show_warning
        if bars:
            transformers_logging.enable_progress_bar()
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()
