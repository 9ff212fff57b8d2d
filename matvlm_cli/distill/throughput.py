"""How fast a distillation runs, as log.jsonl and summary.json record it.

- tokens/s and MFU over steps 10-60 (`WINDOW`: after compilation and autotuning, before the run ends)
  and over the whole run from the start of its first step;
- the time from the start of `matvlm distill` to the end of its first step, and the warm-up: the time to
  step 10 less ten steps at the window's pace;
- the graphs torch.compile made for this run (dynamo's counter, and per compiled module class, less what
  they were when the run began: an earlier run or compile in the same process is not counted);
- the padding fraction (padding slots over all slots) over the window and the run.

MFU counts 6 N FLOPs per token (teacher forward, student forward and backward), N the teacher's
parameters, against the dense matmul rate of this device at the run's precision, measured here.
"""

from __future__ import annotations

import time

import torch

WINDOW = (10, 60)  # steps (10, 60]: the window's clock starts at the end of step 10


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s of `device` at `dtype`: the best of a few square products (8192 on a GPU,
    1024 on a CPU). Filled with ones, so that the global random state is untouched."""
    n, repeats = (8192, 10) if device.type == "cuda" else (1024, 3)
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def compiled_graphs(regions: list[type]) -> tuple[int, dict[str, int]]:
    """Graphs torch.compile has made in this process, and how many each compiled module class holds."""
    from torch._dynamo.utils import counters

    per_region = {}
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        _debug_get_cache_entry_list = None
    if _debug_get_cache_entry_list is not None:
        # Graphs attach to a forward's code; classes that share one (a wrapper's) share their count.
        by_code: dict = {}
        for cls in regions:
            by_code.setdefault(cls.forward.__code__, []).append(cls.__name__)
        per_region = {"+".join(names): len(_debug_get_cache_entry_list(code)) for code, names in by_code.items()}
    return int(counters["stats"]["unique_graphs"]), per_region


class ThroughputMeter:
    """Step times and token counts of one process; tokens are counted for all processes."""

    def __init__(self, started_at: float, flops_per_token: float, peak_flops: float | None, processes: int,
                 regions: list[type]):
        self.started_at, self.flops_per_token, self.peak_flops = started_at, flops_per_token, peak_flops
        self.processes, self.regions = processes, regions
        self.graphs_at_start = compiled_graphs(regions)
        self.first_step_start: float | None = None
        self.first_step_end: float | None = None
        self.step10: float | None = None
        self.last_step_end: float | None = None
        self.totals = {"tokens": 0, "slots": 0}
        self.at_window_start = dict(self.totals)
        self.window: dict | None = None  # filled at the window's end
        self.last_step = 0

    def start(self) -> None:
        """The first step begins (after setup: models loaded, data prepared)."""
        self.first_step_start = time.time()

    def step(self, step: int, tokens: int, slots: int, device: torch.device) -> dict:
        """After optimizer step `step`: its real tokens and token slots (all processes). Returns the fields
        this step adds to its log line."""
        at_window_edge = step in WINDOW
        if at_window_edge and device.type == "cuda":
            torch.cuda.synchronize(device)  # the window's clock reads finished work
        now = time.time()
        self.totals["tokens"] += tokens
        self.totals["slots"] += slots
        self.last_step, self.last_step_end = step, now
        fields = {}
        if self.first_step_end is None:
            self.first_step_end = now
            fields["seconds_to_first_step"] = round(now - self.started_at, 2)
        if step == WINDOW[0]:
            self.step10, self.at_window_start = now, dict(self.totals)
        elif step == WINDOW[1] and self.step10 is not None:
            self.window = self._rates(now - self.step10, {k: self.totals[k] - self.at_window_start[k] for k in self.totals},
                                      WINDOW[1] - WINDOW[0])
            fields |= {f"{k}_10_60": v for k, v in self.window.items() if k in ("tokens_per_s", "mfu", "padding")}
            fields["warmup_s"] = self.window["warmup_s"]
        run = self._rates(now - self.first_step_start, self.totals, step)
        fields["mfu"] = run["mfu"]
        fields["compiled_graphs"] = self.graphs_made()[0]
        return fields

    def graphs_made(self) -> tuple[int, dict[str, int]]:
        """Graphs torch.compile has made since this run began, and per compiled module class."""
        (total, per_region), (total_before, per_region_before) = compiled_graphs(self.regions), self.graphs_at_start
        return total - total_before, {name: count - per_region_before.get(name, 0) for name, count in per_region.items()}

    def _rates(self, seconds: float, counts: dict, steps: int) -> dict:
        tokens_per_s = counts["tokens"] / seconds if seconds > 0 else 0.0
        rates = {"steps": steps, "seconds": round(seconds, 2), "tokens": counts["tokens"], "tokens_per_s": round(tokens_per_s, 1),
                 "mfu": round(tokens_per_s * self.flops_per_token / (self.peak_flops * self.processes), 4) if self.peak_flops else None,
                 "padding": round(1 - counts["tokens"] / counts["slots"], 4) if counts["slots"] else None}
        if self.step10 is not None and steps == WINDOW[1] - WINDOW[0]:
            # compilation and autotuning: the time to step 10 less ten steps at the window's pace
            rates["warmup_s"] = round(self.step10 - self.first_step_start - WINDOW[0] * seconds / steps, 1)
        return rates

    def summary(self) -> dict:
        graphs, per_region = self.graphs_made()
        return {
            "seconds_to_first_step": round(self.first_step_end - self.started_at, 2) if self.first_step_end else None,
            "steps_10_60": self.window,
            "run": self._rates(self.last_step_end - self.first_step_start, self.totals, self.last_step) if self.last_step_end else None,
            "compiled_graphs": graphs, "graphs_per_region": per_region,
            "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops, "processes": self.processes,
        }
