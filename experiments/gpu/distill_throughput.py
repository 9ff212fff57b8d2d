"""Distillation throughput at the paper's teacher shape (issue 13): TinyLLaVA-3.1B's architecture with
random weights, bf16, the paper's losses (KL on all positions + layer loss), `trainable: mamba+connector`,
ratio 0.25 even, through the real `matvlm distill` trainer (data cache, DataLoader workers, accelerate).

For each batch size and with/without gradient checkpointing it records steady-state tokens/s (steps after
the warm-up), MFU (6 N FLOPs per token, N = the teacher's parameters, against the card's measured dense
bf16 rate) and peak GPU memory, into a JSON file.

    python experiments/gpu/distill_throughput.py --output docs/results/distill/distill-throughput-h200.json
    python experiments/gpu/distill_throughput.py --tiny --output /tmp/t.json     # CPU smoke test (tests/test_distill.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from matvlm_cli import kernels  # noqa: E402
from matvlm_cli.recipes import DistillRecipe, build_recipe, check_distill_recipe  # noqa: E402
from matvlm_cli.teacher import CHAT_TEMPLATE  # noqa: E402

PRESET = Path(__file__).resolve().parents[2] / "matvlm_cli/presets/tinyllava-phi2-siglip-3b/config.json"
DENSE_BF16_FLOPS = 788e12  # H200, 8192^3 bf16 matmul on random data (device KINDS.md, 2026-10-28)


class Stop(Exception):
    pass


def teacher_config(tiny: bool):
    """The preset's LLaVA config, or (tiny) the same structure small enough for a CPU test."""
    from transformers import LlavaConfig

    config = LlavaConfig.from_dict(json.loads(PRESET.read_text()))
    if tiny:
        t, v = config.text_config, config.vision_config
        t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads = 64, 128, 4, 4, 4
        t.vocab_size = 512
        v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size = 32, 64, 2, 2, 64, 16
        config.image_token_index = t.vocab_size - 1
    return config


def build_processor(config, known_words: list[str] = ()):
    """A word-level tokenizer of the config's vocabulary (`known_words` first, then w0, w1, ...) and a
    SigLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast, SiglipImageProcessor

    vocab_size = config.text_config.vocab_size
    known = list(dict.fromkeys(known_words))[: vocab_size - 5]
    words = ["<unk>", "<pad>", "<s>", "</s>"] + known + [f"w{i}" for i in range(vocab_size - 5 - len(known))] + ["<image>"]
    assert words.index("<image>") == config.image_token_index
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    size = config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": size, "width": size}, resample=3),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=0, image_token="<image>", chat_template=CHAT_TEMPLATE,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    return processor


def build_teacher(root: Path, tiny: bool, known_words: list[str] = ()) -> tuple[Path, int]:
    """A LLaVA directory of the preset's shape with random weights and `build_processor`'s processor;
    returns it and the parameter count."""
    from transformers import LlavaForConditionalGeneration

    config = teacher_config(tiny)
    processor = build_processor(config, known_words)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    processor.save_pretrained(teacher)
    params = sum(p.numel() for p in model.parameters())
    del model
    return teacher, params


def build_data(root: Path, records: int, text_tokens: int, image_size: int) -> Path:
    """LLaVA-format records of one image and three question-answer pairs, `text_tokens` words in all;
    eight distinct 640x480 JPEG photos-like images (decoded and resized by the workers every time)."""
    rng = random.Random(0)
    images = root / "images"
    images.mkdir()
    for i in range(8):
        noise = torch.randint(0, 255, (480, 640, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        Image.fromarray(noise.numpy()).save(images / f"{i}.jpg", quality=90)
    per_turn = max(2, text_tokens // 6)
    words = lambda n: " ".join(f"w{rng.randrange(1000)}" for _ in range(n))  # noqa: E731
    data = []
    for i in range(records):
        turns = [{"from": "human", "value": "<image>\n" + words(per_turn)}, {"from": "gpt", "value": words(per_turn)}]
        for _ in range(2):
            turns += [{"from": "human", "value": words(per_turn)}, {"from": "gpt", "value": words(per_turn)}]
        data.append({"id": str(i), "image": f"{i % 8}.jpg", "conversations": turns})
    path = root / "data.json"
    path.write_text(json.dumps(data))
    return path


def measure(teacher: Path, data: Path, out: Path, batch: int, checkpointing: bool, steps: int, warmup: int,
            compile: bool = False, profile: Path | None = None) -> dict:
    from matvlm_cli.distill.trainer import run_distill

    recipe = build_recipe(DistillRecipe, {
        "teacher": str(teacher), "student": {"ratio": 0.25, "placement": "even"},
        "data": [{"json": str(data), "image_root": str(data.parent / "images")}],
        "model_max_length": 2048, "trainable": "mamba+connector",
        "losses": {"kl_weight": 1.0, "kl_positions": "all", "layer_weight": 1.0, "ce_weight": 0.0},
        "optimizer": {"lr": 2e-4, "max_grad_norm": 0.1},
        "training": {"batch_size": batch, "max_steps": warmup + steps + 1, "precision": "bf16" if torch.cuda.is_available() else "fp32",
                     "gradient_checkpointing": checkpointing, "group_by_length": False, "compile": compile},
        "output": {"dir": str(out), "log_every": 1, "overwrite": True},
    })
    check_distill_recipe(recipe)
    times, log = [], []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    profiler = None

    def on_step(step):
        nonlocal profiler
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        if profile is not None and step == warmup:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            profiler.__enter__()
        if profiler is not None and step == warmup + 2:
            profiler.__exit__(None, None, None)
            profile.write_text(kernel_table(profiler, steps=2))
            profiler = None
        if step == warmup + steps:
            log.extend(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
            raise Stop  # the run's output is discarded: nothing to keep

    try:
        run_distill(recipe, on_step=on_step)
    except Stop:
        pass
    # times[i] and log[i] are taken at the end of step i + 1; the window is the steps after the warm-up.
    seconds = times[-1] - times[warmup]
    tokens = log[-1]["tokens"] - log[warmup]["tokens"]
    return {"batch": batch, "gradient_checkpointing": checkpointing, "compile": compile, "seconds_per_step": seconds / (steps - 1),
            "tokens_per_step": tokens / (steps - 1), "tokens_per_s": tokens / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "losses_last": {k: log[-1][k] for k in ("kl", "layer")}, "padding": log[-1]["padding"]}


# Kernel-name patterns of each kind of GPU work, for the profile's summary.
KINDS = {
    "matmul": ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "cublas"),
    "attention": ("flash", "fmha", "attention", "sdpa", "efficient"),
    "mamba scan": ("chunk", "state_passing", "bmm", "ssd", "scan", "cumsum"),
    "conv1d": ("conv1d", "causal_conv"),
    "softmax / loss": ("softmax", "log_softmax", "nll", "kl_div"),
    "norm": ("layer_norm", "rms", "norm"),
    "copy / cast": ("copy", "cast", "to_copy", "cat", "fill"),
}


def kernel_table(profiler, steps: int) -> str:
    """GPU time per step by kind of kernel, then the 30 costliest kernels."""
    events = [e for e in profiler.key_averages() if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")]
    if not events:  # older torch: every event, with its device time
        events = [e for e in profiler.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events) or 1
    kinds: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, pats in KINDS.items() if any(p in name for p in pats)), "other elementwise")
        kinds[kind] = kinds.get(kind, 0) + e.self_device_time_total
    lines = [f"GPU time per step: {total / steps / 1e3:.1f} ms"]
    lines += [f"  {k:18s} {v / steps / 1e3:8.1f} ms  {100 * v / total:5.1f} %" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append("costliest kernels (ms per step, calls per step):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
        lines.append(f"  {e.self_device_time_total / steps / 1e3:8.2f}  {e.count // steps:5d}  {e.key[:110]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--batches", default="4,8,16")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=296, help="text tokens per record (728 image tokens come on top)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (CPU smoke test)")
    parser.add_argument("--compile", default="off", help="off | on | off,on: training.compile (regional torch.compile)")
    parser.add_argument("--profile", help="write a GPU kernel-time table of two steps of the first row here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="distill-throughput-"))
    teacher, params = build_teacher(root, args.tiny)
    image_size = json.loads((teacher / "config.json").read_text())["vision_config"]["image_size"]
    batches = [int(b) for b in args.batches.split(",")]
    data = build_data(root, max(batches) * (args.steps + args.warmup + 2), args.text_tokens, image_size)
    rows = []
    combos = [(c == "on", b, k == "on") for c in args.checkpointing.split(",") for k in args.compile.split(",") for b in batches]
    for checkpointing, batch, compiled in combos:
        profile = Path(args.profile) if args.profile and not rows else None
        try:
            row = measure(teacher, data, root / "run", batch, checkpointing, args.steps, args.warmup, compiled, profile)
        except torch.cuda.OutOfMemoryError:
            row = {"batch": batch, "gradient_checkpointing": checkpointing, "compile": compiled, "error": "out of memory"}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if "tokens_per_s" in row:
            row["mfu"] = row["tokens_per_s"] * 6 * params / DENSE_BF16_FLOPS
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "teacher_parameters": params,
        "kernels": kernels.resolved(), "mamba_backward_kernel": next(
            (n for n in kernels.AUTO_ORDER["chunk_scan"] if kernels.trains(n) and kernels.backend_ops(n)), "torch"),
        "text_tokens_per_record": args.text_tokens, "command": " ".join(sys.argv), "rows": rows,
        "mfu_basis": f"6 N FLOPs per token, N = {params}, against {DENSE_BF16_FLOPS / 1e12:.0f} TFLOP/s dense bf16",
    }
    Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
