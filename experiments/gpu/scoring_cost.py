"""Issue 27: what `matvlm convert --placement scored` costs on the TinyLLaVA-3.2B shape.

The teacher is distill_throughput.py's: the tinyllava-phi2-siglip-3b preset's architecture with random weights
(bf16) and a word-level tokenizer; the calibration records are prep_benchmark.py's LLaVA-mix-shaped records
(one 728-token image per image record). The command is the CLI in a subprocess, as a user runs it; its wall
time and the GPU's peak memory (nvidia-smi, polled every 0.2 s) are recorded. Random weights make the
scores themselves meaningless; the cost is what this measures.

    python experiments/gpu/scoring_cost.py --output docs/results/placement/scoring-cost-h200.json
    python experiments/gpu/scoring_cost.py --tiny --output /tmp/s.json        # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "experiments" / "gpu"))
sys.path.insert(0, str(ROOT / "tests"))
from distill_throughput import build_teacher  # noqa: E402
from prep_benchmark import write_mix  # noqa: E402
from tiny import WORDS  # noqa: E402  (the tests' word list)


class PeakGpuMemory:
    """The largest `memory.used` nvidia-smi reports while the block runs (MiB); None without nvidia-smi."""

    def __enter__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                used = max(int(v) for v in out.split())
                self.peak = max(self.peak or 0, used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--records", type=int, default=64, help="calibration records (the CLI's default)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (CPU dry run)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scoring-cost-"))
    started = time.time()
    teacher, params = build_teacher(root, args.tiny, WORDS)
    data = write_mix(root / "mix", 2000, 200)
    setup = time.time() - started
    command = [sys.executable, "-m", "matvlm_cli", "convert", "--teacher", str(teacher), "--placement", "scored",
               "--ratio", str(args.ratio), "--calibration", str(data), "--calibration-images", str(data.parent / "images"), "--calibration-records", str(args.records),
               "--seed", "0", "--output", str(root / "hybrid")]
    with PeakGpuMemory() as memory:
        begun = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
        seconds = time.time() - begun
    hybrid = root / "hybrid" / "config.json"
    block = json.loads(hybrid.read_text()).get("matvlm", {}) if hybrid.is_file() else {}
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "teacher_parameters": params, "teacher_dtype": "bfloat16", "setup_seconds": round(setup, 1),
        "command": " ".join(["matvlm"] + command[3:]), "returncode": done.returncode,
        "convert_seconds": round(seconds, 1), "peak_gpu_memory_mib": memory.peak,
        "placement_calibration": block.get("placement_calibration"), "converted_layers": block.get("layers"),
        "placement_scores": block.get("placement_scores"),
        "stdout_tail": done.stdout.splitlines()[-60:], "stderr_tail": done.stderr.splitlines()[-20:],
    }
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("stdout_tail", "stderr_tail")}, indent=1))
    print("\n".join(result["stdout_tail"]))
    if done.returncode:
        print("\n".join(result["stderr_tail"]))


if __name__ == "__main__":
    main()
