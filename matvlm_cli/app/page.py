"""The Gradio page: an image and a question on the left, one column per model below, each streaming its answer."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page: no telemetry, no version check

import gradio as gr  # noqa: E402
from PIL import UnidentifiedImageError  # noqa: E402

from ..errors import MatvlmError  # noqa: E402
from ..images import open_rgb  # noqa: E402
from .engine import AppModel, Sampling, stream_answer  # noqa: E402
from .samples import Sample  # noqa: E402

TITLE = "matvlm: teacher and hybrids side by side"
# System fonts: the default theme fetches its fonts from the web, and this page must load with no network.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
WAITING = "waiting for the columns to its left"
# The world's pictures are 64 x 64: show them large, pixels as squares, rather than as a thumbnail.
CSS = "#image img, #samples img { image-rendering: pixelated; } #image img { width: 100%; height: 100%; object-fit: contain; }"


def _image_input() -> gr.Image:
    """An image upload handed over as the uploaded file itself (type filepath, no mode), so the model reads
    the very bytes `matvlm generate --image` would. Gradio opens the file first to check it and fails with no
    reason on one that is no image; such a file is passed on instead, and the handler says why in the page.
    (Wrapped on the instance: a subclass of a Gradio component makes Gradio write a .pyi file beside this one.)"""
    image = gr.Image(label="Image", type="filepath", image_mode=None, format="png", sources=["upload", "clipboard"],
                     height=300, elem_id="image")
    check = image.preprocess

    def preprocess(payload):
        try:
            return check(payload)
        except (UnidentifiedImageError, OSError, ValueError):
            return None if payload is None or payload.path is None else str(payload.path)

    image.preprocess = preprocess
    return image


def _read_request(image_path, question, max_new_tokens, temperature, top_p, top_k, seed):
    if not image_path:
        raise MatvlmError("no image: upload one or pick a sample scene")
    if not (question or "").strip():
        raise MatvlmError("no question: type one")
    sampling = Sampling(int(max_new_tokens), float(temperature), float(top_p), int(top_k), int(seed or 0))
    sampling.check()
    return open_rgb(image_path, where="the uploaded file"), question, sampling


def build_page(models: list[AppModel], samples: list[Sample], sample_paths: list) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"# {TITLE}\nOne question about one image, answered by each model in turn with its own chat "
                    "template. Greedy unless the temperature is above 0.")
        with gr.Row():
            with gr.Column(scale=1):
                image = _image_input()
            with gr.Column(scale=2):
                question = gr.Textbox(label="Question", lines=2, placeholder="Describe the image.")
                ask = gr.Button("Ask every model", variant="primary", elem_id="ask")
                gr.Markdown("Sample scenes from the embedded world: click one, then ask.")
                scenes = gr.Gallery([str(path) for path in sample_paths], show_label=False, columns=len(samples),
                                    elem_id="samples", height=150, allow_preview=False, object_fit="contain", interactive=False)
                with gr.Accordion("Sampling", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=Sampling.max_new_tokens, step=1, label="Most new tokens")
                    temperature = gr.Slider(0, 2, value=Sampling.temperature, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1, value=Sampling.top_p, step=0.05, label="Top-p (1: each model's own setting)")
                    top_k = gr.Slider(0, 200, value=Sampling.top_k, step=1, label="Top-k (0: each model's own setting)")
                    seed = gr.Number(value=Sampling.seed, precision=0, label="Seed (sampling)")

        def pick_sample(selected: gr.SelectData):
            return str(sample_paths[selected.index]), samples[selected.index].question

        scenes.select(pick_sample, None, [image, question], api_name=False)
        outputs = []
        with gr.Row(equal_height=True):
            for app_model in models:
                with gr.Column(min_width=240):
                    gr.Markdown(f"### {app_model.name}\n{app_model.layers_line()}  \n*{app_model.origin}*")
                    outputs.append(gr.Textbox(label="Answer", lines=4, interactive=False, elem_id=f"answer-{len(outputs) // 2}"))
                    outputs.append(gr.Markdown())

        def answer_all(image_path, question, max_new_tokens, temperature, top_p, top_k, seed):
            try:
                picture, prompt, sampling = _read_request(image_path, question, max_new_tokens, temperature, top_p, top_k, seed)
            except MatvlmError as err:
                raise gr.Error(str(err), print_exception=False) from None
            shown = ["", WAITING] * len(models)
            for i, app_model in enumerate(models):
                try:
                    for answer in stream_answer(app_model, picture, prompt, sampling):
                        shown[2 * i: 2 * i + 2] = [answer.text, answer.stats_line()]
                        yield tuple(shown)
                except MatvlmError as err:
                    raise gr.Error(str(err), print_exception=False) from None
                except Exception as err:  # this model failed; the other columns still answer
                    shown[2 * i + 1] = f"**error:** {type(err).__name__}: {err}"
                    yield tuple(shown)

        inputs = [image, question, max_new_tokens, temperature, top_p, top_k, seed]
        ask.click(answer_all, inputs, outputs, api_name="ask")
        question.submit(answer_all, inputs, outputs, api_name=False)
    return page


def serve(page: gr.Blocks, port: int, allowed_paths: list[str]) -> None:
    """Start serving on 127.0.0.1 only and return; `page.block_thread()` then serves until Ctrl+C. One
    question at a time: the models are shared."""
    import matplotlib

    matplotlib.get_backend()  # Gradio asks for it around every event; resolving it imports pyplot (1-3 s): now, not on the first question
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, quiet=True, ssr_mode=False,
            mcp_server=False, theme=THEME, css=CSS, allowed_paths=allowed_paths, footer_links=[], prevent_thread_lock=True,
        )
    except OSError as err:  # taken between the check before loading and now
        raise MatvlmError(f"--port {port}: cannot serve on 127.0.0.1:{port} ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
