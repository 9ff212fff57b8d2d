"""Data preparation at the paper's scale (issue 13), on this machine's CPU: a LLaVA-format JSON shaped like
LLaVA-1.5's mix665k (665,058 records; VQA-style records with many short question-answer pairs, long
instruction answers, 6 % text-only multi-turn ShareGPT conversations), through the embedded teacher's
processor, timed from the start of `matvlm distill` to its first step, cold (empty cache) and warm
(a restart that reuses the cache), with the peak RSS of every process involved.

    python experiments/prep_benchmark.py --output docs/results/distill/prep-benchmark.json [--records 665058]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny import WORDS  # noqa: E402  (the tests' word list)

# (share of mix665k, question-answer pairs, answer words, image?) per kind, roughly as LLaVA-1.5 lists them.
KINDS = [
    (0.24, (1, 4), (30, 120), True),    # LLaVA-Instruct conversation / detail / reasoning
    (0.12, (3, 8), (1, 3), True),      # VQAv2
    (0.11, (5, 14), (1, 3), True),     # GQA
    (0.12, (3, 6), (1, 4), True),      # OCR-VQA
    (0.10, (1, 2), (5, 20), True),     # A-OKVQA
    (0.03, (1, 1), (8, 20), True),     # TextCaps
    (0.07, (3, 8), (2, 6), True),      # RefCOCO
    (0.15, (3, 10), (2, 8), True),     # Visual Genome
    (0.06, (2, 8), (30, 100), False),  # ShareGPT, text-only
]


def write_mix(root: Path, records: int, images: int) -> Path:
    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    for i in range(images):
        Image.new("RGB", (320, 240), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(root / "images" / f"{i}.jpg")
    words = lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))  # noqa: E731
    shares = [k[0] for k in KINDS]
    path = root / "mix.json"
    with open(path, "w") as out:
        out.write("[")
        for i in range(records):
            _, pairs, answer, has_image = rng.choices(KINDS, shares)[0]
            turns = []
            for j in range(rng.randint(*pairs)):
                question = words(5, 15)
                turns += [{"from": "human", "value": ("<image>\n" if j == 0 and has_image else "") + question},
                          {"from": "gpt", "value": words(*answer)}]
            record = {"id": f"r{i}", "conversations": turns}
            if has_image:
                record["image"] = f"{rng.randrange(images)}.jpg"
            out.write(("," if i else "") + json.dumps(record))
        out.write("]")
    return path


def time_distill(recipe: Path, out: Path, cache: Path) -> dict:
    """Wall time of `matvlm distill` for one step, and the largest RSS of any process it started."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "matvlm_cli", "distill", str(recipe), "--set", f"output.dir={out}"],
                   check=True, env=os.environ | {"MATVLM_CACHE": str(cache)})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds_to_end_of_first_step": round(seconds, 1), "largest_process_rss_gib": round(max(peak, before) / 2**20, 2),
            "rss_grew_past_earlier_runs": peak > before, "main_process_peak": summary["peak_memory"],
            "skipped_records": summary["skipped_records"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--records", type=int, default=665_058)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prep-benchmark-"))
    started = time.perf_counter()
    data = write_mix(root, args.records, args.images)
    written = time.perf_counter() - started
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "data": [{"json": str(data), "image_root": str(root / "images")}], "model_max_length": 1024,
        "training": {"max_steps": 1, "batch_size": 8}, "output": {"log_every": 1},
    }))
    cache = root / "cache"
    cold = time_distill(recipe, root / "run-cold", cache)
    warm = time_distill(recipe, root / "run-warm", cache)
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpus": len(os.sched_getaffinity(0)), "records": args.records,
        "json_bytes": data.stat().st_size, "seconds_to_write_json": round(written, 1),
        "command": " ".join([Path(sys.executable).name] + sys.argv), "cold": cold, "warm": warm,
        "cache_bytes": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()),
    }
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
