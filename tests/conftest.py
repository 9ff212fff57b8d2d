import os
import subprocess
import sys
import warnings

import pytest
import torch

# Without a GPU, Triton (installed by the Makefile) runs matvlm's kernels in its interpreter on the CPU, for
# tests/test_triton_kernels.py. It must be set before any kernel is decorated, so before matvlm is imported;
# matvlm itself only launches its kernels on CUDA tensors, so nothing else changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import TEXT_FAMILIES, build_tiny_llava  # noqa: E402

FAMILIES = sorted(TEXT_FAMILIES)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Tiny random LLaVA checkpoints, one per text family, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("teachers")
    return {family: build_tiny_llava(root / family, family=family, seed=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    they gain nothing from two, and on a shared 2-core machine a second thread that waits for a busy core
    makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# What Python's default filters hide in a process of its own (`python -m matvlm_cli` is not run as __main__'s
# module, so its DeprecationWarnings are hidden too).
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture
def cli(capsys, monkeypatch):
    """`matvlm ARGS` through the entry point in this process: exit code, stdout and stderr as a
    CompletedProcess, for `assert_one_line`. A subprocess spends 3-5 s importing torch and transformers
    before the first line of matvlm runs; tests that are not about the process itself use this. Warnings
    are shown as in a process of its own (Python's default filters, matvlm's one-line hook, then Python's
    own display), not collected by pytest, so that "one line on stderr" means here what it means there."""
    from matvlm_cli import cli as entry

    def python_display(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    # the hook's fallback: Python's display, as in a process of its own (not pytest's recorder, which may
    # have been current when matvlm_cli.cli was first imported)
    monkeypatch.setattr(entry, "_show_warning", python_display)

    def run(*args, cwd=None):
        capsys.readouterr()  # what the test printed before is not the command's
        here = os.getcwd()
        monkeypatch.setattr(sys, "argv", ["matvlm", *map(str, args)])
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for category in HIDDEN_WARNINGS:
                warnings.simplefilter("ignore", category)
            warnings.showwarning = entry._one_line_warning
            try:
                os.chdir(cwd or here)
                with pytest.raises(SystemExit) as exit:
                    entry.main()
            finally:
                os.chdir(here)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, exit.value.code, captured.out, captured.err)

    return run
