"""Issue 25: `matvlm distill` itself on LLaVA-mix-shaped data, at TinyLLaVA-3.2B's shape, compiled, in bf16.

The data is experiments/prep_benchmark.py's mix (VQA-style records of many short turns, long instruction answers
and 6 % text-only ShareGPT conversations; one 728-token image per image record). The teacher has the
tinyllava-phi2-siglip-3b preset's architecture with random weights and a word-level tokenizer that knows
the mix's words. Each run is the CLI in a subprocess (`python -m matvlm_cli distill recipe.yaml`), with the
paper's losses (KL on every position + layer loss), `trainable: mamba+connector`, ratio 0.25, and one
`training.shapes`; the numbers are the run's own summary.json and log.jsonl (distill/throughput.py).

    python experiments/gpu/distill_shapes.py --runs packed:16x2048 buckets:16 --output docs/results/distill/distill-shapes-h200.json
    python experiments/gpu/distill_shapes.py --padding --output docs/results/distill/distill-shapes-padding.json   # CPU: padding only
    python experiments/gpu/distill_shapes.py --tiny --runs packed:2x4096 --output /tmp/s.json     # CPU dry run

A run is `packed:ROWSxLENGTH`, `buckets:BATCH` or `padded:BATCH`. A run that runs out of GPU memory is
tried again with a quarter fewer rows (or records), once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "experiments" / "gpu"))
sys.path.insert(0, str(ROOT / "tests"))
from distill_throughput import build_processor, build_teacher, teacher_config  # noqa: E402
from prep_benchmark import write_mix  # noqa: E402
from tiny import WORDS  # noqa: E402  (the tests' word list)

H200_DENSE_BF16 = 788e12  # the basis of the earlier distill numbers (docs/results/distill/distill-throughput-h200.json)
MAX_LENGTH = 2048


def recipe_for(run: str, teacher: Path, data: Path, out: Path, steps: int, cuda: bool) -> dict:
    shapes, size = run.split(":")
    training = {"shapes": shapes, "max_steps": steps, "precision": "bf16" if cuda else "fp32", "compile": cuda}
    if shapes == "packed":
        rows, length = size.split("x")
        training |= {"batch_size": int(rows), "pack_length": int(length)}
    else:
        training |= {"batch_size": int(size)}
    return {
        "teacher": str(teacher), "student": {"ratio": 0.25, "placement": "even"},
        "data": [{"json": str(data), "image_root": str(data.parent / "images")}], "model_max_length": MAX_LENGTH,
        "trainable": "mamba+connector", "losses": {"kl_weight": 1.0, "kl_positions": "all", "layer_weight": 1.0, "ce_weight": 0.0},
        "optimizer": {"lr": 2e-4, "max_grad_norm": 0.1}, "training": training,
        "output": {"dir": str(out), "log_every": 1, "overwrite": True},
    }


def smaller(run: str) -> str | None:
    shapes, size = run.split(":")
    if shapes == "packed":
        rows, length = size.split("x")
        return f"packed:{int(rows) * 3 // 4}x{length}" if int(rows) > 1 else None
    return f"{shapes}:{int(size) * 3 // 4}" if int(size) > 1 else None


def distill(run: str, teacher: Path, data: Path, root: Path, steps: int, cuda: bool, timeout: float) -> dict:
    """One `matvlm distill` run; its summary, log and the command's wall time."""
    out = root / run.replace(":", "-")
    recipe = root / f"{out.name}.yaml"
    recipe.write_text(json.dumps(recipe_for(run, teacher, data, out, steps, cuda)))  # JSON is YAML
    env = os.environ | {"MATVLM_CACHE": str(root / "cache"), "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    started = time.time()
    row = {"run": run, "recipe": recipe_for(run, teacher, data, out, steps, cuda)["training"]}
    try:
        done = subprocess.run([sys.executable, "-m", "matvlm_cli", "distill", str(recipe)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            row |= {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:500], "returncode": done.returncode}
    except subprocess.TimeoutExpired:
        row["error"] = f"no end within {timeout:.0f} s"
    row["command_seconds"] = round(time.time() - started, 1)
    # What the run logged, also when it was stopped: the step-60 line holds the 10-60 window's numbers.
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").is_file() else []
    row["steps"] = [{k: e.get(k) for k in ("step", "tokens", "tokens_per_s", "padding", "mfu", "compiled_graphs")} for e in log]
    row["logged"] = {k: v for e in log for k, v in e.items() if k.endswith("_10_60") or k in ("warmup_s", "seconds_to_first_step")}
    if (out / "summary.json").is_file():
        row["summary"] = json.loads((out / "summary.json").read_text())
    return row


def padding_only(args) -> dict:
    """CPU: the mix prepared with the real shape's processor (728 image tokens), then each shape's padding
    from the records' lengths alone (no model): what the rows and buckets would hold."""
    from matvlm_cli.distill.prepare import prepare
    from matvlm_cli.distill.shapes import PackedBatches, default_buckets
    from matvlm_cli.recipes import DataSource

    root = Path(tempfile.mkdtemp(prefix="distill-shapes-"))
    data = write_mix(root / "mix", args.records, 200)
    processor = build_processor(teacher_config(False), WORDS)
    processor.save_pretrained(root / "processor")
    prepared = prepare([DataSource(json=str(data), image_root=str(data.parent / "images"))], root / "processor", processor,
                       MAX_LENGTH, root / "cache")
    import pyarrow as pa

    lengths = pa.ipc.open_file(pa.memory_map(str(prepared.directory / "source-0.arrow"))).read_all().column("length").to_numpy()
    rows = []
    for tokens_per_step in (16 * 2048, 24 * 2048):
        for length in (2048, 4096, 8192):
            sampler = PackedBatches(lengths, tokens_per_step // length, length, seed=0)
            slots = len(sampler) * sampler.rows * length
            rows.append({"shapes": "packed", "rows": sampler.rows, "pack_length": length, "padding": round(1 - lengths.sum() / slots, 4)})
    from matvlm_cli.distill.data import LengthGroupedShuffle

    for batch in (16, 32):
        for name, buckets in (("eighths", default_buckets(MAX_LENGTH)), ("every 128", list(range(128, MAX_LENGTH + 1, 128))), ("none", None)):
            order = list(LengthGroupedShuffle(lengths, 0, batch))
            slots = 0
            for start in range(0, len(order), batch):
                longest = int(lengths[order[start : start + batch]].max())
                width = next(b for b in buckets if b >= longest) if buckets else longest
                slots += width * len(order[start : start + batch])
            rows.append({"shapes": "buckets" if buckets else "padded (grouped by length)", "batch": batch, "buckets": name if buckets else None,
                         "padding": round(1 - lengths.sum() / slots, 4)})
    image = lengths > 700
    return {"date": time.strftime("%Y-%m-%d"), "records": int(len(lengths)), "skipped": dict(prepared.skipped.counts),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "lengths": {"image_records_mean": round(float(lengths[image].mean()), 1), "text_only_mean": round(float(lengths[~image].mean()), 1),
                        "text_only_share": round(float((~image).mean()), 4), "max": int(lengths.max()),
                        "percentiles_10_50_90": [int(np.percentile(lengths, q)) for q in (10, 50, 90)]},
            "padding": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--runs", nargs="*", default=["packed:16x2048"])
    parser.add_argument("--steps", type=int, default=62)
    parser.add_argument("--records", type=int, default=12_000)
    parser.add_argument("--timeout", type=float, default=420, help="seconds per run")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds for everything: no retry that would not fit")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (CPU dry run)")
    parser.add_argument("--padding", action="store_true", help="only the padding each shape gives on the mix (CPU, no model)")
    args = parser.parse_args()
    if args.padding:
        result = padding_only(args)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    cuda = torch.cuda.is_available()
    root = Path(tempfile.mkdtemp(prefix="distill-shapes-"))
    started = time.time()
    teacher, params = build_teacher(root, args.tiny, WORDS)
    data = write_mix(root / "mix", args.records, 200)
    print(f"teacher ({params} parameters) and {args.records} records in {time.time() - started:.0f} s", flush=True)
    from matvlm_cli import kernels
    from matvlm_cli.hybrid import packed

    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "teacher_parameters": params, "records": args.records,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "installed": {name: importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d", "fla")}
        | {"varlen_attention": packed.VARLEN is not None},
        "kernels": kernels.resolved(), "mfu_basis": "each run's own: 6 N FLOPs per token against the dense matmul rate measured "
        f"at its start; mfu_vs_788: against {H200_DENSE_BF16 / 1e12:.0f} TFLOP/s, the earlier runs' basis", "runs": [],
    }
    for run in args.runs:
        row = distill(run, teacher, data, root, args.steps, cuda, args.timeout)
        if "out of memory" in row.get("error", "") and smaller(run) and time.time() - started + args.timeout < args.budget:
            row = {"tried": row} | distill(smaller(run), teacher, data, root, args.steps, cuda, args.timeout)
        for part in ("steps_10_60", "run"):
            rates = (row.get("summary", {}).get("throughput") or {}).get(part)
            if rates:
                rates["mfu_vs_788"] = round(rates["tokens_per_s"] * 6 * params / H200_DENSE_BF16, 4)
        print(json.dumps({k: v for k, v in row.items() if k != "steps"})[:4000], flush=True)
        result["runs"].append(row)
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
