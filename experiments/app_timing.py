"""Time `matvlm app` the way a person uses it: start it with its defaults (the embedded teacher and its
default conversion), then ask each sample scene's question through the page's API (gradio_client) and
time each question from the request to the last answer, both columns included.

    python experiments/app_timing.py [--output docs/results/app/app-timing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from app_screenshot import free_port, wait_for  # noqa: E402 (this folder's script)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from matvlm_cli.app.samples import sample_scenes, write_samples  # noqa: E402


def main(output: Path, rounds: int) -> None:
    from gradio_client import Client, handle_file

    port = free_port()
    started = time.perf_counter()
    app = subprocess.Popen([sys.executable, "-m", "matvlm_cli", "app", "--port", str(port)])
    try:
        wait_for(f"http://127.0.0.1:{port}/", 300)
        startup = time.perf_counter() - started
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        rows = []
        with tempfile.TemporaryDirectory() as folder:
            samples = sample_scenes()
            for round_ in range(rounds):
                for path, sample in zip(write_samples(Path(folder), samples), samples):
                    start = time.perf_counter()
                    shown = client.predict(handle_file(str(path)), sample.question, 64, 0.0, 1.0, 0, 0, api_name="/ask")
                    seconds = time.perf_counter() - start
                    rows.append({"round": round_, "scene": sample.name, "question": sample.question,
                                 "seconds": round(seconds, 3), "answers": list(shown[0::2]), "stats": list(shown[1::2])})
                    print(f"{sample.name}  {seconds:5.2f} s  " + " | ".join(shown[1::2]))
    finally:
        app.terminate()
        app.wait(60)
    times = [row["seconds"] for row in rows]
    summary = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_end": os.getloadavg(), "command": "python experiments/app_timing.py",
        "startup_seconds": round(startup, 2), "questions": len(rows),
        "median_seconds": round(statistics.median(times), 3), "max_seconds": round(max(times), 3),
        "first_question_seconds": times[0], "rows": rows,
    }
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output)
    print(f"startup {startup:.1f} s; {len(rows)} questions: median {summary['median_seconds']} s, "
          f"max {summary['max_seconds']} s; wrote {output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/app/app-timing.json")
    parser.add_argument("--rounds", type=int, default=2, help="times through the six sample questions")
    args = parser.parse_args()
    main(args.output, args.rounds)
