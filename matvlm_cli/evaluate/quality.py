"""Held-out quality of a model on the world's benchmark sets, with the benchmarks' scoring rules.

A quick check for the embedded teacher and its hybrids (greedy, the benchmarks' prompts); the
`evaluate` subcommand is the full lm-eval based harness.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import AutoProcessor

from ..hybrid.processors import render_chat
from ..world.questions import mmmu_prompt, pope_prompt, textvqa_prompt
from .metrics import mmmu_score, pope_lmms_eval, vqa_accuracy


def _rows(path: Path, limit: int | None) -> list[dict]:
    rows = pq.read_table(next(path.glob("data/*.parquet"))).to_pylist()
    return rows[:limit] if limit else rows


def _image(struct: dict) -> Image.Image:
    return Image.open(io.BytesIO(struct["bytes"])).convert("RGB")


@torch.no_grad()
def answer(model, processor, prompts: list[str], images: list[Image.Image], batch_size: int = 64, max_new_tokens: int = 32) -> list[str]:
    responses = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        texts = [
            render_chat(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}])
            for p in prompts[start : start + batch_size]
        ]
        inputs = processor(images=images[start : start + batch_size], text=texts, return_tensors="pt", padding=True).to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, inputs["input_ids"].shape[1] :]:
            responses.append(processor.decode(row, skip_special_tokens=True).split("\n\n")[0].strip())
    return responses


def benchmark_scores(model, model_dir: Path, world: Path, limit: int | None = None) -> dict[str, float]:
    processor = AutoProcessor.from_pretrained(model_dir)
    scores: dict[str, float] = {}

    pope = _rows(world / "pope", limit)
    replies = answer(model, processor, [pope_prompt(r["question"]) for r in pope], [_image(r["image"]) for r in pope])
    pope_metrics = pope_lmms_eval([(reply, r["answer"], r["category"]) for reply, r in zip(replies, pope)])
    for category, metrics in pope_metrics["categories"].items():
        scores[f"pope_{category}_accuracy"] = metrics["accuracy"]

    mmmu = _rows(world / "mmmu", limit)
    options = [ast.literal_eval(r["options"]) for r in mmmu]
    replies = answer(model, processor, [mmmu_prompt(r["question"], o) for r, o in zip(mmmu, options)], [_image(r["image_1"]) for r in mmmu])
    correct = [mmmu_score(r["id"], r["question_type"], r["answer"], reply, o) for r, o, reply in zip(mmmu, options, replies)]
    scores["mmmu_accuracy"] = sum(correct) / len(correct)

    textvqa = _rows(world / "textvqa", limit)
    replies = answer(model, processor, [textvqa_prompt(r["question"]) for r in textvqa], [_image(r["image"]) for r in textvqa])
    scores["textvqa_accuracy"] = sum(vqa_accuracy(reply, r["answers"]) for reply, r in zip(replies, textvqa)) / len(textvqa)
    return scores
