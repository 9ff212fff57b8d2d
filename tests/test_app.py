"""`matvlm app` with real parts: the page served on 127.0.0.1, asked through gradio_client and opened in
headless Chromium; its answers against `matvlm generate`'s; its bad input before anything starts."""

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image, ImageStat
from ports import free_port

from matvlm_cli.app.samples import sample_scenes, write_samples
from matvlm_cli.paths import default_teacher_dir

HAS_GRADIO = importlib.util.find_spec("gradio") is not None
needs_gradio = pytest.mark.skipif(not HAS_GRADIO, reason='needs the app extra: pip install "matvlm[app]"')
needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium chromium-driver)"
)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--window-size=1280,1000", "--virtual-time-budget=20000",
]
DEFAULT_NAMES = ["tiny-teacher", "tiny-teacher-hybrid-0.25-even"]  # the teacher, then convert's default name


def matvlm(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "matvlm_cli", *map(str, args)], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`matvlm app` with its defaults (the embedded teacher and its default conversion), served for the module."""
    if not HAS_GRADIO:
        pytest.skip('needs the app extra: pip install "matvlm[app]"')
    logs = tmp_path_factory.mktemp("app")
    port = free_port()
    with open(logs / "out.txt", "w") as out, open(logs / "err.txt", "w") as err:
        server = subprocess.Popen([sys.executable, "-m", "matvlm_cli", "app", "--port", str(port)], stdout=out, stderr=err)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"matvlm app exited: {(logs / 'err.txt').read_text()}"
            assert time.monotonic() < deadline, "matvlm app did not serve within 300 s"
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(60)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    chosen = sample_scenes()
    return list(zip(write_samples(tmp_path_factory.mktemp("samples"), chosen), chosen))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """What `matvlm convert` writes for the embedded teacher with its defaults."""
    output = tmp_path_factory.mktemp("convert") / "tiny-teacher-hybrid-0.25-even"
    result = matvlm("convert", "--output", output)
    assert result.returncode == 0, result.stderr
    return output


def ask(url, image, question, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=0):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return client.predict(handle_file(str(image)), question, max_new_tokens, temperature, top_p, top_k, seed, api_name="/ask")


@needs_gradio
def test_answers_equal_generate(app_url, samples, converted, cli):
    image, sample = samples[0]  # a description: 16 tokens from the teacher, 64 from the unconverted hybrid
    shown = ask(app_url, image, sample.question)
    answers, stats = shown[0::2], shown[1::2]
    for model_dir, answer in zip([default_teacher_dir(), converted], answers, strict=True):
        result = cli("generate", "--model", model_dir, "--image", image, "--prompt", sample.question)
        assert result.returncode == 0, result.stderr
        assert answer.strip() and result.stdout == answer + "\n", model_dir
    assert answers[0] != answers[1]  # the columns are two different models
    for line in stats:
        assert re.fullmatch(r"\d+\.\d\d s to first token · [\d.]+ tokens/s · \d+ tokens in \d+\.\d\d s", line), line


@needs_gradio
def test_sampling_is_seeded_and_a_non_image_upload_is_a_message(app_url, samples, tmp_path):
    from gradio_client.exceptions import AppError

    image, sample = samples[3]
    first = ask(app_url, image, sample.question, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=20, seed=3)
    again = ask(app_url, image, sample.question, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=20, seed=3)
    assert first[0::2] == again[0::2]
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(AppError, match=r"the uploaded file: cannot be read as an image \(not a recognised image format\)"):
        ask(app_url, text, sample.question)
    assert ask(app_url, image, sample.question)[0].strip()  # and the page still answers


@needs_gradio
@needs_chromium
def test_page_renders_in_headless_chromium(app_url, tmp_path):
    def chromium(*args):
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"  # a fresh profile per run
        return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, app_url],
                              capture_output=True, text=True, timeout=180)

    dom = chromium("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Rendered headings, not the page's embedded config (which names the models before any script runs).
    assert re.findall(r"<h3[^>]*>([^<]*)</h3>", dom.stdout) == DEFAULT_NAMES
    assert "Mamba-2 layers: 0, 4 (2 of 8)" in dom.stdout and 'id="ask"' in dom.stdout
    assert len(re.findall(r'class="thumbnail-item', dom.stdout)) == len(sample_scenes())

    shot = tmp_path / "page.png"
    result = chromium(f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    picture = Image.open(shot).convert("RGB")
    assert picture.size[0] == 1280
    # A blank page has no variance; one stuck on "Loading..." has a little, and a few hundred colours.
    assert ImageStat.Stat(picture.convert("L")).stddev[0] > 15
    assert len(picture.getcolors(maxcolors=1 << 20)) > 300


# ------------------------------------------------------------------------------------------ bad input


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Serving" not in result.stdout and "Loading" not in result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_without_the_extra_it_says_how_to_install_it():
    # sys.modules[name] = None is how Python marks a module as not importable: find_spec gives None.
    code = "import sys; sys.modules['gradio'] = None; sys.argv = ['matvlm', 'app']; from matvlm_cli.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, 'pip install "matvlm[app]"')


@needs_gradio
def test_a_port_in_use_is_refused_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = matvlm("app", "--port", port, timeout=120)
    assert_one_line_error(result, f"--port {port}", "already in use")


@needs_gradio
def test_a_text_only_model_is_refused(tmp_path, cli):
    from tiny import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "text-only"
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = cli("app", "--model", default_teacher_dir(), "--model", folder, "--port", free_port())
    assert_one_line_error(result, str(folder), "text-only model (LlamaForCausalLM)")


# ------------------------------------------------------------------------- the engine, without a server


def test_explicit_model_folders_answer_as_generate_does(converted, samples):
    """`--model DIR` columns: the engine's answer equals `run_generate`'s for the same folder, image and prompt."""
    from rich.console import Console

    from matvlm_cli.app.engine import column_names, load_app_model, stream_answer
    from matvlm_cli.generate import run_generate
    from matvlm_cli.images import open_rgb

    image, sample = samples[1]  # a reading question
    [name] = column_names([converted])
    column = load_app_model(converted, name)
    assert column.mamba_layers == [0, 4] and column.layers_line() == "Mamba-2 layers: 0, 4 (2 of 8)"
    *_, last = stream_answer(column, open_rgb(image), sample.question)
    assert last.done and last.tokens >= 1 and last.first_token_s > 0
    assert last.text == run_generate(converted, image, sample.question, console=Console(quiet=True))


def test_the_default_hybrid_is_converts_default_output(converted):
    import torch

    from matvlm_cli.app.engine import embedded_hybrid
    from matvlm_cli.hybrid import load_hybrid

    in_memory, saved = embedded_hybrid(), load_hybrid(converted)
    assert in_memory.name == converted.name and in_memory.mamba_layers == [0, 4]
    ours, theirs = in_memory.model.state_dict(), saved.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_column_names_tell_same_named_folders_apart(tmp_path):
    from matvlm_cli.app.engine import column_names

    paths = [tmp_path / "a" / "final", tmp_path / "b" / "final", tmp_path / "teacher"]
    assert column_names(paths) == [str(paths[0]), str(paths[1]), "teacher"]


@pytest.mark.parametrize("field,value,message", [
    ("max_new_tokens", 0, "most new tokens"), ("temperature", -1.0, "temperature"),
    ("temperature", float("inf"), "temperature"), ("top_p", 1.5, "top-p"), ("top_k", -1, "top-k"),
])
def test_sampling_settings_are_checked(field, value, message):
    from matvlm_cli.app.engine import Sampling
    from matvlm_cli.errors import MatvlmError

    with pytest.raises(MatvlmError, match=message):
        Sampling(**{field: value}).check()


def test_generate_samples_with_the_models_own_filters():
    """`matvlm generate --temperature` leaves top-p and top-k to the model's generation config, as before the app."""
    from matvlm_cli.generate import sampling_options

    assert sampling_options(0.0) == {"do_sample": False}
    assert sampling_options(0.7) == {"do_sample": True, "temperature": 0.7}
    assert sampling_options(0.7, top_p=0.9, top_k=20) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}
