"""Decoding speed of an export on this CPU: vLLM (offline `LLM`) against transformers' `generate()`, at
batch 1 and 8, the same image prompt in every row, greedy, a fixed number of new tokens (EOS ignored).
Tokens/s = new tokens of the whole batch / wall time of the call (prefill included), median of
`REPEATS` after one warm-up. Each side runs in its own environment and adds its rows to one JSON file:

  .venv/bin/python experiments/serve_bench.py transformers runs/serve-check/export-converted docs/results/serving/serve-bench.json
  .venv-serve/bin/python experiments/serve_bench.py vllm runs/serve-check/export-converted docs/results/serving/serve-bench.json

Both sides run one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)): on a shared 2-core machine a
second thread mostly waits for a busy core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 8)
NEW_TOKENS = 64
REPEATS = 3
QUESTION = "How many objects are there in the image?"


def _image():
    """A red square on white (speed does not depend on the picture; the world's renderer needs pyarrow,
    which the serving environment has not)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((8, 8, 40, 40), fill="red")
    return image


def _prompt(path: Path) -> str:
    from matvlm_cli.hybrid.processors import load_processor, render_chat

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return render_chat(load_processor(path), chat, add_generation_prompt=True)


def _median_time(run) -> float:
    run()  # warm-up
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_transformers(path: Path) -> dict[int, float]:
    import torch
    from transformers import AutoModelForImageTextToText

    from matvlm_cli.hybrid.processors import load_processor

    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor, prompt, image = load_processor(path), _prompt(path), _image()
    result = {}
    for batch in BATCHES:
        inputs = processor(text=[prompt] * batch, images=[image] * batch, return_tensors="pt")

        def run():
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            assert out.shape == (batch, inputs["input_ids"].shape[1] + NEW_TOKENS)

        result[batch] = batch * NEW_TOKENS / _median_time(run)
    return result


def bench_vllm(path: Path) -> dict[int, float]:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from matvlm_cli.serve.check import CPU_ENGINE
    from matvlm_cli.serve.servable import check_servable, engine_options, vllm_is_cpu_build

    llm = LLM(str(path), **CPU_ENGINE, **engine_options(check_servable(path), cpu=vllm_is_cpu_build()))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
    request = {"prompt": _prompt(path), "multi_modal_data": {"image": _image()}}
    result = {}
    for batch in BATCHES:
        def run():
            outputs = llm.generate([request] * batch, params, use_tqdm=False)
            assert sum(len(o.outputs[0].token_ids) for o in outputs) == batch * NEW_TOKENS

        result[batch] = batch * NEW_TOKENS / _median_time(run)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=("transformers", "vllm"))
    parser.add_argument("export", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    from matvlm_cli.atomic import write_atomic

    speeds = (bench_transformers if args.engine == "transformers" else bench_vllm)(args.export)
    report = json.loads(args.output.read_text()) if args.output.exists() else {}
    report.setdefault("rows", {})[args.engine] = {str(batch): round(speed, 1) for batch, speed in speeds.items()}
    report["setup"] = (f"{args.export.name}, {NEW_TOKENS} new tokens per row, fp32, one thread, median of {REPEATS}; "
                       f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    write_atomic(args.output, json.dumps(report, indent=1) + "\n")
    print(args.engine, {batch: f"{speed:.1f} tokens/s" for batch, speed in speeds.items()})


if __name__ == "__main__":
    main()
