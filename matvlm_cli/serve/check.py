"""`make serve-check`: matvlm's exports served by vLLM give transformers' greedy tokens.

Two environments, two phases, one work folder:
- `reference` (the project's environment; transformers >= 5.23 computes an export as it was
  trained): through the CLI, convert the embedded default, distil it briefly, export both, and export
  a text-only hybrid of the embedded teacher's language model and tiny random LLaVA-NeXT and Idefics3
  hybrids (tests/zoo.py); then transformers' greedy tokens and top log-probabilities for each prompt, into
  `reference.json`.
- `vllm` (the serving environment, `.venv-serve`): each export in `vllm.LLM` (text prompts, image
  prompts, a prompt longer than one Mamba chunk), and the distilled VLM behind `matvlm serve` on
  127.0.0.1, asked a chat message carrying an image through the `openai` client. Each is compared
  with the reference: the same prompt ids, the same greedy tokens, log-probabilities within
  `LOGPROB_GAP`. It prints one line per check and `N passed, N failed`, and exits 1 on a failure.

python -m matvlm_cli.serve.check reference runs/serve-check
python -m matvlm_cli.serve.check vllm runs/serve-check
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NEW_TOKENS = 12
TOP_REFERENCE = 20  # log-probabilities kept per step from transformers
TOP_VLLM = 5  # asked of vLLM; each must be among the reference's
LOGPROB_GAP = 1e-4  # fp32 target of issue 24
LAYERS = "1,7"
DISTILL_STEPS = 20
SERVER_START_S = 600
# vLLM's CPU backend on a small shared machine: its KV cache is a fraction of all memory (0.1 is plenty
# for 512 tokens), one process and no thread pinning (pinned spin-waiting threads crawl beside other work).
CPU_ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.1,
                  distributed_executor_backend="uni")
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


# --- the prompts -------------------------------------------------------------------------------------

def _scenes(count: int):
    from ..world.scenes import render, sample_scene

    rng = random.Random("matvlm-serve-check")
    return [render(sample_scene(rng)) for _ in range(count)]


QUESTIONS = ("What color is the square in the image?", "How many objects are there in the image?",
             "What shape is the red object in the image?")
TEXT_QUESTIONS = ("What color is a circle?", "Is there a blue star?")
LONG_CONTEXT = " ".join(["a large red square at the top left and a small blue circle at the bottom right ."] * 18)


def _chat(question: str, image: bool) -> list[dict]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


# --- phase 1: exports and transformers' answers --------------------------------------------------------

def _matvlm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "matvlm_cli", *args], check=True)


def _text_only_teacher(path: Path) -> Path:
    """The embedded teacher's language model alone, as a LlamaForCausalLM with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ..hybrid import load_teacher
    from ..paths import default_teacher_dir

    teacher = load_teacher(default_teacher_dir())
    text = LlamaForCausalLM(teacher.config.text_config)
    state = {f"model.{key}": value for key, value in teacher.model.language_model.state_dict().items()}
    state["lm_head.weight"] = teacher.lm_head.weight
    text.load_state_dict(state, strict=True)
    text.generation_config = teacher.generation_config
    text.to(torch.float32).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_teacher_dir()).save_pretrained(path)
    return path


# Tiny random teachers of tests/zoo.py, with their real processors, served as exports of their families.
ZOO_FAMILIES = {"llava-next": "llava_next", "idefics3": "idefics3"}


def _tiny_zoo_teacher(family: str, path: Path) -> Path:
    """The tiny random teacher of `family` from tests/zoo.py (LLaVA-NeXT's anyres tiles, Idefics3's tiles
    and pixel shuffle) with head_dim 32: vLLM's CPU attention has no kernel for the zoo's 16."""
    sys.path.insert(0, str(Path("tests").resolve()))
    import zoo

    text = dict(zoo.TEXT)
    zoo.TEXT["hidden_size"] = 128
    try:
        return zoo.save(family, path)
    finally:
        zoo.TEXT.clear()
        zoo.TEXT.update(text)


def build_exports(work: Path) -> dict[str, Path]:
    _matvlm("convert", "--layers", LAYERS, "--output", str(work / "hybrid-converted"), "--overwrite")
    _matvlm("distill", "recipes/tiny-default.yaml", "--set", f"training.max_steps={DISTILL_STEPS}",
            "--set", "optimizer.warmup_steps=5", "--set", "optimizer.decay_steps=10", "--set", "output.save_every=1000",
            "--set", f"output.dir={work / 'distill'}", "--set", "output.overwrite=true")
    _text_only_teacher(work / "text-teacher")
    _matvlm("convert", "--teacher", str(work / "text-teacher"), "--layers", LAYERS,
            "--output", str(work / "hybrid-text"), "--overwrite")
    exports = {"converted": work / "hybrid-converted", "distilled": work / "distill" / "final", "text": work / "hybrid-text"}
    for name, family in ZOO_FAMILIES.items():
        _tiny_zoo_teacher(family, work / f"{name}-teacher")
        _matvlm("convert", "--teacher", str(work / f"{name}-teacher"), "--layers", "1,3",
                "--output", str(work / f"hybrid-{name}"), "--overwrite")
        exports[name] = work / f"hybrid-{name}"
    for name, hybrid in exports.items():
        _matvlm("export", str(hybrid), "--output", str(work / f"export-{name}"), "--overwrite")
    return {name: work / f"export-{name}" for name in exports}


def _greedy(model, inputs: dict) -> dict:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    steps = []
    for logits in out.logits:
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        top = torch.topk(logprobs, TOP_REFERENCE)
        steps.append({str(i): v for i, v in zip(top.indices.tolist(), top.values.tolist())})
    return {"prompt_ids": inputs["input_ids"][0].tolist(), "tokens": out.sequences[0, prompt:].tolist(), "logprobs": steps}


def reference(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from ..atomic import write_atomic
    from ..hybrid.processors import load_processor, render_chat

    work.mkdir(parents=True, exist_ok=True)
    exports = build_exports(work)
    images = _scenes(len(QUESTIONS))
    image_files = []
    for index, image in enumerate(images):
        image_files.append(str(work / f"scene-{index}.png"))
        image.save(image_files[-1])
    result = {"exports": {}, "chat": None}
    for name, path in exports.items():
        prompts = []
        if name == "text":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            texts = [f"USER: {q} ASSISTANT:" for q in TEXT_QUESTIONS] + [f"USER: {LONG_CONTEXT} {TEXT_QUESTIONS[0]} ASSISTANT:"]
            for kind, text in zip(("text", "text", "long"), texts):
                inputs = dict(tokenizer(text, return_tensors="pt"))
                prompts.append({"kind": kind, "text": text, "image": None, **_greedy(model, inputs)})
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
            processor = load_processor(path)
            cases = [("text", q, None) for q in TEXT_QUESTIONS]
            cases += [("image", q, i) for i, q in enumerate(QUESTIONS)]
            cases += [("long", f"{LONG_CONTEXT} {QUESTIONS[0]}", 0)]
            for kind, question, image in cases:
                text = render_chat(processor, _chat(question, image is not None), add_generation_prompt=True)
                inputs = processor(text=text, images=None if image is None else [images[image]], return_tensors="pt")
                prompts.append({"kind": kind, "text": text, "image": None if image is None else image_files[image],
                                "question": question, **_greedy(model, dict(inputs))})
            if name == "distilled":
                result["chat"] = {"export": str(path), "question": QUESTIONS[1], "image": image_files[1],
                                  **next(p for p in prompts if p["kind"] == "image" and p["question"] == QUESTIONS[1])}
        result["exports"][name] = {"path": str(path), "prompts": prompts}
        del model
    write_atomic(work / "reference.json", json.dumps(result, indent=1))
    print(f"reference: {sum(len(e['prompts']) for e in result['exports'].values())} prompts over "
          f"{len(exports)} exports -> {work / 'reference.json'}")


# --- phase 2: vLLM against the reference ---------------------------------------------------------------

class Tally:
    def __init__(self):
        self.passed = self.failed = 0
        self.largest_gap = 0.0

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.passed += ok
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def compare(tally: Tally, name: str, expected: dict, prompt_ids: list[int], tokens: list[int],
            logprobs: list[dict[int, float]]) -> None:
    """Prompt ids, greedy tokens and every log-probability vLLM returned, against transformers'."""
    if list(prompt_ids) != expected["prompt_ids"]:
        tally.check(name, False, f"prompt ids differ ({len(prompt_ids)} vs transformers' {len(expected['prompt_ids'])})")
        return
    if list(tokens) != expected["tokens"]:
        tally.check(name, False, f"tokens {list(tokens)} vs transformers' {expected['tokens']}")
        return
    gap = 0.0
    for got, want in zip(logprobs, expected["logprobs"], strict=True):
        for token, value in got.items():
            if str(token) not in want:  # far outside transformers' top 20: as wrong as a token
                gap = math.inf
                break
            gap = max(gap, abs(value - want[str(token)]))
    tally.largest_gap = max(tally.largest_gap, gap)
    tally.check(name, gap <= LOGPROB_GAP,
                f"{len(prompt_ids)} prompt ids and {len(tokens)} greedy tokens identical, largest logprob gap {gap:.1e}")


def _offline(tally: Tally, name: str, export: dict) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    from .servable import check_servable, engine_options, vllm_is_cpu_build

    started = time.perf_counter()
    llm = LLM(export["path"], **CPU_ENGINE, **engine_options(check_servable(export["path"]), cpu=vllm_is_cpu_build()))
    requests = [{"prompt": p["text"]} if p["image"] is None else
                {"prompt": p["text"], "multi_modal_data": {"image": Image.open(p["image"]).convert("RGB")}}
                for p in export["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=TOP_VLLM)
    outputs = llm.generate(requests, params, use_tqdm=False)
    for index, (prompt, output) in enumerate(zip(export["prompts"], outputs, strict=True)):
        completion = output.outputs[0]
        logprobs = [{token: entry.logprob for token, entry in step.items()} for step in completion.logprobs]
        compare(tally, f"{name} offline {prompt['kind']} #{index}", prompt, output.prompt_token_ids,
                completion.token_ids, logprobs)
    print(f"     ({name}: loaded and answered {len(requests)} prompts in {time.perf_counter() - started:.0f} s)", flush=True)
    del llm, outputs  # the engine runs in this process: free it for the next export's
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def _served_chat(tally: Tally, chat: dict, work: Path) -> None:
    from openai import OpenAI

    port = _free_port()
    log = open(work / "server.log", "w")
    command = [str(Path(sys.executable).parent / "matvlm"), "serve", chat["export"], "--port", str(port),
               "--max-model-len", "512", "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.1",
               "--distributed-executor-backend", "uni"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV},
                              start_new_session=True)
    try:
        started = time.perf_counter()
        _wait_for(f"http://127.0.0.1:{port}/health", server, SERVER_START_S)
        print(f"     (server ready in {time.perf_counter() - started:.0f} s)", flush=True)
        image = base64.b64encode(Path(chat["image"]).read_bytes()).decode()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        response = client.chat.completions.create(
            model=chat["export"], temperature=0.0, max_tokens=NEW_TOKENS, logprobs=True, top_logprobs=TOP_VLLM,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": chat["question"]},
            ]}],
            extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
        )
        choice = response.choices[0]
        extra = {**(response.model_extra or {}), **(choice.model_extra or {})}
        token_id = lambda text: int(text.removeprefix("token_id:"))  # noqa: E731
        logprobs = [{token_id(top.token): top.logprob for top in step.top_logprobs} for step in choice.logprobs.content]
        compare(tally, "distilled served chat with an image (openai client)", chat, extra.get("prompt_token_ids") or [],
                extra.get("token_ids") or [], logprobs)
    except Exception as err:  # the server's own log says more
        tally.check("distilled served chat with an image (openai client)", False, f"{type(err).__name__}: {err} (see {work / 'server.log'})")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def check_vllm(work: Path) -> int:
    expected = json.loads((work / "reference.json").read_text())
    os.environ.update(CPU_ENV)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: one vLLM import, not three
    tally = Tally()
    for name, export in expected["exports"].items():
        try:
            _offline(tally, name, export)
        except Exception as err:
            tally.check(f"{name} offline", False, f"{type(err).__name__}: {err}")
    _served_chat(tally, expected["chat"], work)
    print(f"largest logprob gap {tally.largest_gap:.1e} (target {LOGPROB_GAP:.0e})")
    print(f"{tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("reference", "vllm"))
    parser.add_argument("work", type=Path)
    args = parser.parse_args()
    if args.phase == "reference":
        reference(args.work)
    else:
        raise SystemExit(check_vllm(args.work))


if __name__ == "__main__":
    main()
