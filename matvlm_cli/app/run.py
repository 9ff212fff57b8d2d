"""The `app` subcommand's engine: check everything the command was given, load each model once, serve the page."""

from __future__ import annotations

import errno
import importlib.util
import socket
import tempfile
from pathlib import Path

from rich.console import Console

from ..errors import MatvlmError

HOST = "127.0.0.1"
INSTALL_EXTRA = 'pip install "matvlm[app]"'


def check_extra() -> None:
    if importlib.util.find_spec("gradio") is None:
        raise MatvlmError(f"matvlm app needs Gradio, an optional extra: install it with {INSTALL_EXTRA}")


def check_port(port: int) -> None:
    """The port can be served on 127.0.0.1 now (the server binds it the same way, SO_REUSEADDR included)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as err:
            why = "already in use" if err.errno == errno.EADDRINUSE else err.strerror or str(err)
            raise MatvlmError(f"--port {port}: {HOST}:{port} is {why}; pick another port with --port") from None


def run_app(model_dirs: list[Path], port: int, console: Console | None = None) -> None:
    console = console or Console()
    check_extra()
    check_port(port)
    # torch and transformers load after the quick checks
    from ..hybrid.checks import check_model
    from .engine import Sampling, column_names, default_models, load_app_model, stream_answer
    from .samples import sample_scenes, write_samples

    for path in model_dirs:
        check_model(path, images_for="the app")

    with console.status("Loading the models"):
        if model_dirs:
            models = [load_app_model(path, name) for path, name in zip(model_dirs, column_names(model_dirs))]
        else:
            models = default_models()
    for app_model in models:
        console.print(f"[bold]{app_model.name}[/bold]: {app_model.layers_line()}", highlight=False)
    samples = sample_scenes()
    with console.status("Warming up"):  # the first forward pass of a model is slow: not the first visitor's
        for app_model in models:
            for _ in stream_answer(app_model, samples[0].image, samples[0].question, Sampling(max_new_tokens=2)):
                pass

    from .page import build_page, serve

    with tempfile.TemporaryDirectory(prefix="matvlm-app-") as folder:
        page = build_page(models, samples, write_samples(Path(folder), samples))
        serve(page, port, allowed_paths=[folder])
        console.print(f"Serving on http://{HOST}:{port} (Ctrl+C to stop)", highlight=False)
        page.block_thread()
