"""What a run shows and records as it trains: the progress bar, log.jsonl and the tracker (tensorboard),
with the tokens, padding and throughput (throughput.py) of its steps."""

from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..recipes import OutputSettings
from .throughput import ThroughputMeter

BAR_WIDTH = 12
TIME_WIDTH = len("0:00:00")  # rich's time remaining


def step_summary(stats: dict, width: int) -> str:
    """The numbers beside the bar, most wanted first (loss, tokens/s, then the loss's parts and the learning
    rate), as many as fit in `width` characters: a terminal of 80 columns shows the first few whole, a wide one
    all of them; log.jsonl has every one."""
    parts = [f"loss {stats['loss']:.4g}", f"{stats['tokens_per_s']} tok/s",
             *(f"{name} {stats[name]:.4g}" for name in ("kl", "layer", "ce") if name in stats), f"lr {stats['lr']:.2e}"]
    shown: list[str] = []
    for part in parts:
        if len("  ".join([*shown, part])) > width:
            break
        shown.append(part)
    return "  ".join(shown)


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


class StepReport:
    """Counts every micro-batch's tokens (`count`), then reports each optimizer step: `stats` makes its
    log line and moves the progress bar, `record` writes the line where it is due."""

    def __init__(self, accelerator: Accelerator, console: Console, out: Path, output: OutputSettings,
                 meter: ThroughputMeter, total_steps: int, staged: bool):
        self.accelerator, self.console, self.out, self.output = accelerator, console, out, output
        self.meter, self.total_steps, self.staged = meter, total_steps, staged

    @contextmanager
    def running(self, step: int):
        """Open while the run trains from optimizer step `step`: the clock, the bar, the log."""
        acc = self.accelerator
        progress = Progress(
            TextColumn("[bold]distill[/bold] {task.completed}/{task.total}"), BarColumn(bar_width=BAR_WIDTH),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
            disable=not acc.is_main_process,
        )
        # what the numbers may take: the terminal less the step count, the bar, the time left and the gaps
        self.stats_width = self.console.width - len(f"distill {self.total_steps}/{self.total_steps}") - BAR_WIDTH - TIME_WIDTH - 3
        self.log = (self.out / "log.jsonl").open("a") if acc.is_main_process else None
        if acc.log_with:
            acc.init_trackers("tensorboard")
        self.started, self.tokens = time.time(), 0
        self.real, self.padded = 0, 0  # tokens since the last log line, for its padding fraction
        self.step_tokens, self.step_slots = 0, 0  # since the last optimizer step, all processes
        self.meter.start()
        try:
            with progress:
                self.progress = progress
                self.task = progress.add_task("distill", total=self.total_steps, completed=step, stats="")
                yield self
        finally:
            if self.log:
                self.log.close()

    def seconds(self) -> float:
        """Since the run began training."""
        return time.time() - self.started

    def count(self, batch: dict) -> None:
        """One micro-batch of this process went through: its real tokens and its slots, for all processes."""
        processes = self.accelerator.num_processes
        in_batch = int(batch["attention_mask"].sum())
        self.tokens += in_batch * processes
        self.real, self.padded = self.real + in_batch, self.padded + batch["attention_mask"].numel()
        self.step_tokens += in_batch * processes
        self.step_slots += batch["attention_mask"].numel() * processes

    def stats(self, step: int, parts: dict[str, torch.Tensor], total: torch.Tensor, lr: float, stage: int) -> dict:
        """Optimizer step `step` is done: its log line, with its losses (the mean over processes, so that a
        multi-GPU log reads like a single-process one), and the bar moves."""
        acc = self.accelerator
        logged = {k: acc.reduce(v.detach(), "mean") for k, v in (parts | {"loss": total}).items()}
        stats = {k: round(v.item(), 5) for k, v in logged.items()}
        speed = self.meter.step(step, self.step_tokens, self.step_slots, acc.device)
        self.step_tokens, self.step_slots = 0, 0
        stats |= {"lr": lr, "tokens_per_s": round(self.tokens / (time.time() - self.started)),
                  "padding": round(1 - self.real / max(1, self.padded), 4), "tokens": self.tokens} | speed
        if self.staged:
            stats["stage"] = stage
        self.progress.update(self.task, completed=step, stats=step_summary(stats, self.stats_width))
        return stats

    def record(self, step: int, epoch: int, stats: dict) -> None:
        """Writes the step's line to the tracker and log.jsonl every output.log_every steps, at the last
        step, with an evaluation, and for the first step and the end of the 10-60 window whatever
        log_every says."""
        if (step % self.output.log_every == 0 or step == self.total_steps or "eval_loss" in stats
                or "seconds_to_first_step" in stats or "tokens_per_s_10_60" in stats):
            self.accelerator.log(stats, step=step)
            if self.log:
                self.log.write(json.dumps({"step": step, "epoch": epoch} | stats) + "\n")
                self.log.flush()
            self.real, self.padded = 0, 0
