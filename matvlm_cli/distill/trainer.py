"""The distillation recipe: set up, then train step by step, checkpointing, and save the final hybrid.

One recipe runs unchanged on one CPU, one GPU or several GPUs: accelerate owns devices, mixed
precision, gradient accumulation and data sharding (`accelerate launch -m matvlm_cli distill ...`).
Each job has its module: the output folder (output.py), data and loaders (loaders.py), models,
optimizer groups and FSDP units (models.py), stages (stages.py), the losses of a step (objective.py),
checkpoints and the final save (checkpoint.py), and what a step reports (report.py).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.console import Console

from ..errors import MatvlmError
from ..hybrid.processors import load_processor
from ..recipes import DistillRecipe
from .checkpoint import Checkpointer
from .loaders import build_loaders, open_dataset, prepare_sources
from .models import FROZEN_DTYPE, build_models, fsdp_plugin, fsdp_units, param_groups
from .objective import DistillationObjective, loss_weights, weighted_total
from .output import OutputFolder
from .records import SkipReport
from .report import StepReport, peak_memory
from .stages import StagePlan
from .throughput import ThroughputMeter, measured_peak_flops

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class DistillRun:
    """One run of a recipe: `setup()`, then `train()`. Its position is (step, epoch, batch_in_epoch):
    optimizer steps done, and batches taken from the current epoch."""

    def __init__(self, recipe: DistillRecipe, console: Console | None = None, started_at: float | None = None):
        self.recipe = recipe
        self.console = console or Console()
        self.out = Path(recipe.output.dir)
        self.output = OutputFolder(recipe)
        self.checkpointer = Checkpointer(self.out, recipe.output.keep_checkpoints)
        self.started_at = started_at if started_at is not None else time.time()

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        r = self.recipe
        self.accelerator = self._accelerator()
        # The output folder is claimed before any work; its old contents go only once all is ready (below).
        from ..paths import default_teacher_dir

        self.teacher_dir = Path(r.teacher) if r.teacher else default_teacher_dir()
        resume = self.checkpointer.resume_dir(r.output.resume)
        replace = self.output.claim(resume, self.teacher_dir) if self.accelerator.is_main_process else False
        # Data, then models: the dataset needs the model's family, the models nothing of the data.
        processor_dir = Path(r.student.path or self.teacher_dir)
        self.processor = load_processor(processor_dir, trust_remote_code=r.trust_remote_code)
        sources, prepared = prepare_sources(r, processor_dir, self.processor, self.accelerator, self.console)
        with self.console.status("Loading teacher and building the student"):
            self.shared, self.block = build_models(r, self.teacher_dir)
        model = self.shared.model
        self.dataset = open_dataset(r, prepared, sources, self.processor, model.config, self.accelerator, self.console)
        self.unreadable = SkipReport()  # records whose image fails to decode when its batch is built
        # Loaders, stages, optimizer and FSDP units, then the accelerator wraps them.
        regions = self._prepare_model(model)
        loader, eval_loader = build_loaders(r, self.dataset, model.config, self.processor.tokenizer.pad_token_id, self.accelerator)
        self._plan_steps(loader)
        optimizer, scheduler = self._optimizer(model)
        self._shard(model)
        self.meter = self._meter(regions)
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(model, optimizer, loader, scheduler)
        self.eval_loader = self.accelerator.prepare(eval_loader) if eval_loader is not None else None
        self.shared.move_teacher_copies(self.accelerator.device)
        self.objective = DistillationObjective(self.accelerator, self.shared)
        # The position: the start, or the checkpoint's.
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        if resume is not None:
            self._resume(resume)
        self._enter_stage(self.plan.index(self.step))
        if self.accelerator.is_main_process:
            self.output.start(replace)

    def _accelerator(self) -> Accelerator:
        r = self.recipe
        from accelerate.utils import is_tensorboard_available

        accelerator = Accelerator(
            mixed_precision=PRECISION[r.training.precision], gradient_accumulation_steps=r.training.gradient_accumulation,
            step_scheduler_with_optimizer=False,  # we step it once per optimizer step; accelerate would step it once per process
            log_with="tensorboard" if is_tensorboard_available() else None, project_dir=str(self.out),
            fsdp_plugin=fsdp_plugin() if r.training.distributed == "fsdp" else None,
        )
        set_seed(r.training.seed)
        if r.stages and accelerator.num_processes > 1:
            raise MatvlmError("stages: a stepwise run trains in one process for now (DDP fixes the trained parameters "
                              "when it wraps the model, and a stage changes them); run it without --num-gpus")
        self.output.check_kind()
        return accelerator

    def _prepare_model(self, model: torch.nn.Module) -> list[type]:
        """Checkpointing and compilation as the recipe says; returns the compiled regions."""
        t = self.recipe.training
        if t.gradient_checkpointing:
            # transformers 5.24 calls it activation checkpointing and warns on the old name; versions without it keep that.
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        # Packed batches have one shape: compiled for it. Padded and bucketed ones compile once for any length
        # (compiled per bucket, the recompile limit of 8 was reached by the norms after a few buckets).
        regions = self.shared.compile_frozen_parts(dynamic=t.shapes != "packed" or None) if t.compile else []
        model.train()
        return regions

    def _plan_steps(self, loader) -> None:
        r = self.recipe
        self.steps_per_epoch = math.ceil(len(loader) / r.training.gradient_accumulation)
        self.total_steps = (sum(s.max_steps for s in r.stages) if r.stages
                            else r.training.max_steps or self.steps_per_epoch * r.training.epochs)
        self.plan = StagePlan(r, self.shared.layers, self.total_steps)
        self.stage = 0

    def _optimizer(self, model: torch.nn.Module):
        o = self.recipe.optimizer
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, self.shared.optimized), lr=o.lr, betas=tuple(o.betas))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self.plan.lr_factor)

    def _shard(self, model: torch.nn.Module) -> None:
        # accelerate shards only with several processes; one device runs the same recipe unsharded.
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # Each decoder layer its own FSDP unit, so the layer loss can call a converted layer alone.
            plugin = self.accelerator.state.fsdp_plugin
            plugin.transformer_cls_names_to_wrap = fsdp_units(model, self.shared.decoder_layer(self.shared.layers[0]))

    def _meter(self, regions: list[type]) -> ThroughputMeter:
        """MFU's basis (throughput.py), counted and measured before the model is wrapped."""
        acc, matmul_dtype = self.accelerator, FROZEN_DTYPE[self.recipe.training.precision]
        return ThroughputMeter(self.started_at, 6 * self.shared.teacher_parameters(),
                               measured_peak_flops(acc.device, matmul_dtype), acc.num_processes, regions)

    def _enter_stage(self, index: int) -> None:
        """From here on the student runs the stage's layers as Mamba-2 and trains what it says."""
        stage = self.plan.stages[index]
        self.stage = index
        self.shared.set_stage(stage.layers, self.plan.trainable(index))
        if len(self.plan) > 1 and self.accelerator.is_main_process:
            self.console.print(f"stage {index + 1}/{len(self.plan)} from step {self.plan.starts[index]}: layers {stage.layers}, "
                               f"trainable {self.plan.trainable(index)}, {stage.max_steps} steps")

    # -- training ------------------------------------------------------------------------------
    def train(self, on_step=None) -> Path:
        r, acc = self.recipe, self.accelerator
        report = StepReport(acc, self.console, self.out, r.output, self.meter, self.total_steps, len(self.plan) > 1)
        with report.running(self.step):
            for batch in self._batches():
                with acc.accumulate(self.model):
                    parts = self._losses(batch)
                    total = self._total(parts)
                    acc.backward(total)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(self.model.parameters(), self.plan.optimizer(self.stage).max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                report.count(batch)
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.step += 1
                stats = report.stats(self.step, parts, total, self.scheduler.get_last_lr()[0], self.stage)
                if r.output.eval_every and (self.step % r.output.eval_every == 0 or self.step == self.total_steps):
                    stats |= self.evaluate()
                report.record(self.step, self.epoch, stats)
                if r.output.save_every and self.step % r.output.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if on_step:
                    on_step(self.step)
                if self.step >= self.total_steps:
                    break
        final = self.save_final(report.seconds())
        self._drop_wrapper()
        # Last: accelerate's end_training also destroys the process group that save_final waits on.
        acc.end_training()
        return final

    def _drop_wrapper(self) -> None:
        """Free the DDP/FSDP wrapper while the process group still exists. Its reducer holds a reference to
        the group; were it the last, the group's destructor would run inside the reducer's deallocation with
        the GIL held, joining gloo's worker threads while one of them waits for the GIL to free a tensor: a
        hang at exit, seen in the suite's two-process run (pytorch/pytorch#56297). Freed first, the group ends
        in `destroy_process_group`."""
        self.model = self.accelerator.unwrap_model(self.model)
        self.accelerator.free_memory()

    def _batches(self):
        """The usable batches from the run's position on, epoch after epoch while steps remain; the position
        and the stage follow them."""
        while self.step < self.total_steps:
            # Through the prepared loader: accelerate's own iteration counter would otherwise reset the
            # sampler's epoch at every `iter()`, and that counter starts again at 0 after a resume.
            self.loader.set_epoch(self.epoch)
            loader = self.accelerator.skip_first_batches(self.loader, self.batch_in_epoch) if self.batch_in_epoch else self.loader
            step_at_epoch_start = self.step
            for batch in loader:
                self.batch_in_epoch += 1
                if not self._usable(batch):
                    continue
                if self.plan.index(self.step) != self.stage:
                    self._enter_stage(self.plan.index(self.step))
                yield batch
            if self.step == step_at_epoch_start:
                raise MatvlmError(f"data: a whole epoch gave no usable batch ({'; '.join(self.unreadable.lines())})")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _usable(self, batch: dict) -> bool:
        """Counts and reports the batch's records whose image could not be decoded; False when none is left."""
        for record_id, why in batch.pop("broken"):
            self.unreadable.add(why, record_id)
            self.console.print(f"[yellow]data:[/yellow] skipped record {record_id}: {why}")
        if "input_ids" in batch:
            return True
        if self.accelerator.num_processes > 1:  # the other processes would wait for this one's gradients forever
            raise MatvlmError(f"data: every record of a batch has an unreadable image ({'; '.join(self.unreadable.lines())})")
        return False

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch, self.plan.losses(self.stage))

    def _weights(self) -> dict[str, float]:
        return loss_weights(self.plan.losses(self.stage))

    def _total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        total = weighted_total(parts, self.plan.losses(self.stage))
        if not torch.isfinite(total):
            raise MatvlmError(
                f"loss became {total.item()} at step {self.step + 1}; stopped. "
                f"Last good checkpoint: {self.checkpointer.latest() or 'none'}. {self._nonfinite_advice()}"
            )
        return total

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss components over the held-out records (every process takes its share)."""
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for batch in self.eval_loader:
            if not self._usable(batch):
                continue
            parts = self._losses(batch)
            parts["loss"] = weighted_total(parts, self.plan.losses(self.stage))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.detach()
            batches += 1
        return {f"eval_{k}": round(self.accelerator.reduce(v / batches, "mean").item(), 5) for k, v in sums.items()}

    def _nonfinite_advice(self) -> str:
        precision = self.recipe.training.precision
        if precision == "fp32":
            return "Lower optimizer.lr, or optimizer.max_grad_norm."
        return f"Lower optimizer.lr, or use training.precision: fp32 (it is {precision})."

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        position = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "stage": self.plan.index(self.step)}
        return self.checkpointer.save(self.accelerator, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler,
                                      self.shared.optimized, position, self._nonfinite_advice())

    def _resume(self, path: Path) -> None:
        position = self.checkpointer.load(path, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler)
        self.step, self.epoch, self.batch_in_epoch = position["step"], position["epoch"], position["batch_in_epoch"]
        self.console.print(f"Resumed from {path} (step {self.step})")

    def save_final(self, seconds: float) -> Path:
        """The hybrid in output.dir/final and the run's summary.json."""
        acc = self.accelerator
        acc.wait_for_everyone()
        peak = peak_memory()
        stages = {"distill_stages": self.plan.described()} if len(self.plan) > 1 else {}
        final = self.checkpointer.save_final(acc, acc.unwrap_model(self.model), self.shared,
                                             self.block | {"distill_steps": self.step} | stages, self.teacher_dir)
        if acc.is_main_process:
            summary = {"steps": self.step, "seconds": round(seconds, 1), "peak_memory": peak, "processes": acc.num_processes,
                       "distributed": acc.distributed_type.value, "shapes": self.recipe.training.shapes,
                       "throughput": self.meter.summary(),
                       "skipped_records": dict(self.dataset.skipped.counts), "unreadable_images": dict(self.unreadable.counts)}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self.console.print(f"Distilled {self.step} steps in {seconds:.0f}s, peak memory {peak}. Hybrid saved to [bold]{final}[/bold]")
        acc.wait_for_everyone()
        return final


def launch_processes(num_gpus: int, recipe_path: Path, overrides: list[str], resume: bool) -> int:
    """`--num-gpus N`: the same command under `accelerate launch` with N processes (DDP, or FSDP where
    the recipe says so)."""
    import subprocess
    import sys

    visible = torch.cuda.device_count()
    if visible < num_gpus:
        raise MatvlmError(f"--num-gpus {num_gpus}: this machine shows {visible} CUDA GPU(s); each process needs its own GPU")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_gpus),
               "-m", "matvlm_cli", "distill", str(recipe_path)]
    command += [arg for text in overrides for arg in ("--set", text)] + (["--resume"] if resume else [])
    return subprocess.call(command)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (`kill`, a scheduler's cancel) raised as KeyboardInterrupt, as Ctrl-C is, so the run cleans
    up the same way: an output folder it created with nothing to resume from is removed, and the same
    command can be run again. Signal handlers belong to the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@sigterm_as_interrupt()
def run_distill(recipe: DistillRecipe, console: Console | None = None, on_step=None, started_at: float | None = None) -> Path:
    """`started_at`: when the command started (time.time()), for the time to the first step; by default
    when this process started (the Python imports count: a user waits for them too)."""
    if started_at is None:
        import psutil

        started_at = psutil.Process().create_time()
    run = DistillRun(recipe, console, started_at)
    try:
        run.setup()
        try:
            return run.train(on_step=on_step)
        except torch.cuda.OutOfMemoryError:
            t = recipe.training
            raise MatvlmError(
                f"CUDA out of memory at step {run.step + 1}: lower training.batch_size (now {t.batch_size}) and raise "
                f"training.gradient_accumulation to keep the global batch, set training.gradient_checkpointing: true, "
                f"use training.precision: bf16, or lower model_max_length (now {recipe.model_max_length})"
            ) from None
    except BaseException:
        run.output.discard_unfinished()
        raise
    finally:
        run.output.release()
