"""The distillation run: setup, train, checkpoint, resume, final hybrid.

One recipe runs unchanged on one CPU, one GPU or several GPUs: accelerate owns devices, mixed
precision, gradient accumulation and data sharding (`accelerate launch -m matvlm_cli distill ...`).
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Subset, Sampler

from ..errors import MatvlmError
from ..hybrid.conversion import choose_layers, convert_to_hybrid, find_decoder, hybrid_layers
from ..hybrid.io import HYBRID_KEY, atomic_directory, load_hybrid, load_teacher, save_hybrid, write_atomic
from ..recipes import DataSource, DistillRecipe
from .data import ConversationDataset, collate
from .losses import ce_loss, kl_loss, layer_loss
from .shared import SharedTeacherStudent

# Whole (unsharded) state, gathered onto the main process's CPU.
WHOLE_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# Reading turns are about 3 % of the embedded world's training turns, so a short distillation sees few
# of them: six more passes over them lifted TextVQA-style from 0.68 to 0.84 after the 700 steps of
# tiny-default.yaml (three: 0.80), with nothing lost elsewhere (README, Distill).
EMBEDDED_READING_WEIGHT = 6.0


def embedded_world_sources(console: Console):
    """The embedded world's training conversations, generated once into the cache, plus their reading
    turns again at `EMBEDDED_READING_WEIGHT`."""
    from ..world import cache_dir, generate_world
    from ..world.questions import reading_records
    from ..world.writers import WORLD_VERSION

    cache = cache_dir()
    train = cache / f"world-seed0-distill-v{WORLD_VERSION}" / "train"
    conversations, reading = train / "conversations.json", train / "reading.json"
    if not conversations.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with console.status(f"Generating the embedded world into {train.parent}"):
            generate_world(train.parent, seed=0, train_size=20_000, overwrite=True)
    if not reading.is_file():
        write_atomic(reading, json.dumps(reading_records(json.loads(conversations.read_text()))))
    return [
        DataSource(json=str(conversations), image_root=str(train)),
        DataSource(json=str(reading), image_root=str(train), weight=EMBEDDED_READING_WEIGHT),
    ]


class EpochShuffle(Sampler):
    """A fresh permutation per epoch from (seed, epoch): reproducible, and resumable mid-epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


def lr_factor(schedule: str, step: int, total: int, warmup: int, decay: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    decay_start = total - decay  # warmup-stable-decay
    return 1.0 if step < decay_start else max(0.0, (total - step) / max(1, decay))


def build_models(recipe: DistillRecipe, teacher_dir: Path) -> tuple[SharedTeacherStudent, dict]:
    """The student with the teacher's attention beside each Mamba-2 mixer; one copy of the rest."""
    kwargs = {"trust_remote_code": recipe.trust_remote_code}
    if recipe.student.path:
        student = load_hybrid(recipe.student.path, **kwargs)
        teacher = load_teacher(teacher_dir, **kwargs)
        if len(find_decoder(student).layers) != len(find_decoder(teacher).layers):
            raise MatvlmError("student.path: its decoder does not have the teacher's number of layers")
        layers = hybrid_layers(student)
        attentions = {i: find_decoder(teacher).attention(i) for i in layers}
    else:
        # The teacher's attention modules are kept aside before conversion replaces them: no copy.
        student = load_teacher(teacher_dir, **kwargs)
        layout = find_decoder(student)
        layers = choose_layers(len(layout.layers), recipe.student.ratio, recipe.student.placement, recipe.student.layers)
        attentions = {i: layout.attention(i) for i in layers}
        convert_to_hybrid(student, layers, seed=recipe.student.seed, source=str(teacher_dir),
                          ratio=len(layers) / len(layout.layers),
                          placement=None if recipe.student.layers else recipe.student.placement)
    block = dict(getattr(student.config, HYBRID_KEY)) | {"distilled_from": str(teacher_dir)}
    separate = load_teacher(teacher_dir, **kwargs) if recipe.trainable == "all" else None
    return SharedTeacherStudent(student, attentions, recipe.trainable, separate), block


def fsdp_plugin():
    """FSDP2 (per-parameter sharding): frozen and trainable weights may share a unit, and a unit may be
    called on its own outside the model's forward, as the layer loss does."""
    from accelerate import FullyShardedDataParallelPlugin

    # No state_dict_type: checkpoints and the final hybrid gather whole state themselves (WHOLE_ON_MAIN).
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")


def fsdp_units(model: torch.nn.Module, decoder_layer: torch.nn.Module) -> list[str]:
    """Class names that become FSDP units: the decoder's layers, plus the model's own no-split blocks
    (e.g. the vision tower's layers) where it names them."""
    present = {type(m).__name__ for m in model.modules()}
    named = [name for name in getattr(model, "_no_split_modules", None) or [] if name in present]
    return sorted(set(named) | {type(decoder_layer).__name__})


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on 1-D parameters (A_log, D, dt_bias, norms, biases)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LayerCapture:
    """Records, in one teacher pass, each replaced layer's call arguments and output."""

    def __init__(self, layers: dict[int, torch.nn.Module]):
        self.active, self.calls, self.outputs = False, {}, {}
        self.handles = []
        for idx, layer in layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._pre(idx), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(idx)))

    def _pre(self, idx):
        def hook(module, args, kwargs):
            if self.active:
                self.calls[idx] = (args, kwargs)
        return hook

    def _post(self, idx):
        def hook(module, args, output):
            if self.active:
                self.outputs[idx] = _first(output)
        return hook


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor on the CPU; a collective for an FSDP-sharded parameter."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().contiguous()


def _whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the main process (a collective under FSDP). Tied weights share
    one tensor again, as in the model, so `save_pretrained` writes them once."""
    state = get_model_state_dict(model, options=WHOLE_ON_MAIN)
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first_name.setdefault(id(param), name)]
    return state


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class DistillRun:
    def __init__(self, recipe: DistillRecipe, console: Console | None = None):
        self.recipe = recipe
        self.console = console or Console()
        self.out = Path(recipe.output.dir)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        r = self.recipe
        from accelerate.utils import is_tensorboard_available

        self.accelerator = Accelerator(
            mixed_precision=PRECISION[r.training.precision], gradient_accumulation_steps=r.training.gradient_accumulation,
            step_scheduler_with_optimizer=False,  # we step it once per optimizer step; accelerate would step it once per process
            log_with="tensorboard" if is_tensorboard_available() else None, project_dir=str(self.out),
            fsdp_plugin=fsdp_plugin() if r.training.distributed == "fsdp" else None,
        )
        set_seed(r.training.seed)
        resume = self._resume_dir()
        if self.out.exists() and resume is None and r.output.resume != "auto" and self.accelerator.is_main_process:
            if r.output.overwrite:
                shutil.rmtree(self.out)
            elif any(self.out.iterdir()):
                raise MatvlmError(f"output.dir: {self.out} already exists (set output.resume: auto to continue, or output.overwrite: true)")
        from ..tiny import default_teacher_dir

        self.teacher_dir = Path(r.teacher) if r.teacher else default_teacher_dir()
        with self.console.status("Loading teacher and building the student"):
            self.shared, self.block = build_models(r, self.teacher_dir)
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(r.student.path or self.teacher_dir)
        with self.accelerator.main_process_first():  # one process generates the embedded world
            sources = r.data or embedded_world_sources(self.console)
        with self.console.status("Reading and tokenising the data"):
            self.dataset = ConversationDataset(sources, self.processor, r.model_max_length, seed=r.training.seed)
        for line in self.dataset.skipped.lines():
            self.console.print(f"[yellow]data:[/yellow] {line}")
        model = self.shared.model
        if r.training.gradient_checkpointing:
            # transformers 5.24 calls it activation checkpointing and warns on the old name; versions without it keep that.
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
        held_out = r.output.eval_samples if r.output.eval_every else 0
        if held_out >= len(self.dataset):
            raise MatvlmError(f"output.eval_samples: {held_out} would hold out all {len(self.dataset)} usable records")
        train_set = Subset(self.dataset, range(held_out, len(self.dataset)))
        self.sampler = EpochShuffle(len(train_set), r.training.seed)
        pad = self.processor.tokenizer.pad_token_id
        loader = DataLoader(train_set, batch_size=r.training.batch_size, sampler=self.sampler,
                            collate_fn=lambda b: collate(b, pad), num_workers=r.training.num_workers)
        eval_loader = DataLoader(Subset(self.dataset, range(held_out)), batch_size=r.training.batch_size,
                                 collate_fn=lambda b: collate(b, pad)) if held_out else None
        optimizer = torch.optim.AdamW(param_groups(model, r.optimizer.weight_decay), lr=r.optimizer.lr, betas=tuple(r.optimizer.betas))
        self.steps_per_epoch = math.ceil(len(loader) / r.training.gradient_accumulation)
        self.total_steps = r.training.max_steps or self.steps_per_epoch * r.training.epochs
        o = r.optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(o.schedule, s, self.total_steps, o.warmup_steps, o.decay_steps)
        )
        # accelerate shards only with several processes; one device runs the same recipe unsharded.
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # Each decoder layer its own FSDP unit, so the layer loss can call a converted layer alone.
            plugin = self.accelerator.state.fsdp_plugin
            plugin.transformer_cls_names_to_wrap = fsdp_units(model, self.shared.decoder_layer(self.shared.layers[0]))
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(model, optimizer, loader, scheduler)
        self.eval_loader = self.accelerator.prepare(eval_loader) if eval_loader is not None else None
        if self.shared.teacher_connector is not None:
            self.shared.teacher_connector.to(self.accelerator.device)
        if self.shared.separate_teacher is not None:
            self.shared.separate_teacher.to(self.accelerator.device)
        self.capture = LayerCapture({idx: self.shared.teacher_layer(idx) for idx in self.shared.layers})
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        if resume is not None:
            self._load_checkpoint(resume)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(asdict(r), sort_keys=False))

    # -- training ------------------------------------------------------------------------------
    def train(self, on_step=None) -> Path:
        r, acc = self.recipe, self.accelerator
        progress = Progress(
            TextColumn("[bold]distill[/bold] step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
            disable=not acc.is_main_process,
        )
        log = (self.out / "log.jsonl").open("a") if acc.is_main_process else None
        if acc.log_with:
            acc.init_trackers("tensorboard")
        started, tokens = time.time(), 0
        with progress:
            task = progress.add_task("distill", total=self.total_steps, completed=self.step, stats="")
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch)
                loader = acc.skip_first_batches(self.loader, self.batch_in_epoch) if self.batch_in_epoch else self.loader
                for batch in loader:
                    self.batch_in_epoch += 1
                    with acc.accumulate(self.model):
                        parts = self._losses(batch)
                        total = sum(w * parts[k] for k, w in self._weights().items() if w)
                        if not torch.isfinite(total):
                            raise MatvlmError(
                                f"loss became {total.item()} at step {self.step + 1}; stopped. "
                                f"Last good checkpoint: {self._latest_checkpoint() or 'none'}. Lower optimizer.lr or use fp32."
                            )
                        acc.backward(total)
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(self.model.parameters(), r.optimizer.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    tokens += int(batch["attention_mask"].sum()) * acc.num_processes
                    if not acc.sync_gradients:
                        continue
                    self.scheduler.step()
                    self.step += 1
                    # Mean over processes, so a multi-GPU log reads like a single-process one.
                    logged = {k: acc.reduce(v.detach(), "mean") for k, v in (parts | {"loss": total}).items()}
                    stats = {k: round(v.item(), 5) for k, v in logged.items()}
                    stats |= {"lr": self.scheduler.get_last_lr()[0], "tokens_per_s": round(tokens / (time.time() - started))}
                    progress.update(task, completed=self.step, stats="  ".join(
                        [f"{k} {v:.4f}" for k, v in stats.items() if k in ("loss", "kl", "layer", "ce")]
                        + [f"lr {stats['lr']:.2e}", f"{stats['tokens_per_s']} tok/s"]))
                    if r.output.eval_every and (self.step % r.output.eval_every == 0 or self.step == self.total_steps):
                        stats |= self.evaluate()
                    if self.step % r.output.log_every == 0 or self.step == self.total_steps or "eval_loss" in stats:
                        acc.log(stats, step=self.step)
                        if log:
                            log.write(json.dumps({"step": self.step, "epoch": self.epoch} | stats) + "\n")
                            log.flush()
                    if r.output.save_every and self.step % r.output.save_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if on_step:
                        on_step(self.step)
                    if self.step >= self.total_steps:
                        break
                else:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    continue
                break
        if log:
            log.close()
        final = self.save_final(time.time() - started)
        # Last: accelerate's end_training also destroys the process group that save_final waits on.
        acc.end_training()
        return final

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss components over the held-out records (every process takes its share)."""
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for batch in self.eval_loader:
            parts = self._losses(batch)
            parts["loss"] = sum(w * parts[k] for k, w in self._weights().items() if w)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.detach()
            batches += 1
        return {f"eval_{k}": round(self.accelerator.reduce(v / batches, "mean").item(), 5) for k, v in sums.items()}

    def _weights(self) -> dict[str, float]:
        l = self.recipe.losses
        return {"kl": l.kl_weight, "layer": l.layer_weight, "ce": l.ce_weight}

    def _losses(self, batch) -> dict[str, torch.Tensor]:
        l = self.recipe.losses
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        with torch.no_grad(), self.shared.teacher_path(self.model) as teacher:
            self.capture.active = True
            teacher_logits = teacher(**inputs).logits
            self.capture.active = False
        student_logits = self.model(**inputs).logits
        mask = batch["attention_mask"].bool()
        parts = {}
        if l.kl_weight:
            positions = mask if l.kl_positions == "all" else (batch["labels"] != -100)
            parts["kl"] = kl_loss(student_logits, teacher_logits, positions, l.kl_temperature)
        if l.layer_weight:
            distances = []
            for idx in self.shared.layers:
                args, kwargs = self.capture.calls[idx]
                layer = self.shared.decoder_layer(idx)
                with self.accelerator.autocast():  # the prepared model's forward autocasts; this call is outside it
                    student_out = _first(layer(*args, **kwargs))
                distances.append(layer_loss(student_out, self.capture.outputs[idx], mask, l.layer_loss))
            parts["layer"] = torch.stack(distances).mean()
        if l.ce_weight:
            parts["ce"] = ce_loss(student_logits, batch["labels"])
        return parts

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("step-*"))

    def _latest_checkpoint(self) -> Path | None:
        done = [c for c in self._checkpoints() if (c / "state.json").is_file()]
        return done[-1] if done else None

    def _resume_dir(self) -> Path | None:
        resume = self.recipe.output.resume
        if resume is None:
            return None
        if resume == "auto":
            return self._latest_checkpoint()
        return Path(resume)

    def save_checkpoint(self) -> Path:
        """Trainable weights (safetensors), optimizer, scheduler, RNG and data position, atomically.
        Weights and optimizer state are written whole, keyed by name, so any process count resumes them."""
        acc = self.accelerator
        acc.wait_for_everyone()
        target = self.out / "checkpoints" / f"step-{self.step:07d}"
        model = acc.unwrap_model(self.model)
        # Every process takes part: under FSDP each holds only a shard of these.
        weights = {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}
        optimizer = get_optimizer_state_dict(model, self.optimizer.optimizer, options=WHOLE_ON_MAIN)
        if acc.is_main_process:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_directory(target, overwrite=True) as tmp:
                save_file(weights, tmp / "trainable.safetensors")
                torch.save(optimizer, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save({"torch": torch.get_rng_state(), "python": random.getstate()[1]}, tmp / "rng.pt")
                (tmp / "state.json").write_text(json.dumps({"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}))
            for old in self._checkpoints()[: -self.recipe.output.keep_checkpoints or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def _load_checkpoint(self, path: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        weights = load_file(path / "trainable.safetensors")
        unknown = sorted(set(weights) - {n for n, _ in model.named_parameters()})
        if unknown:
            raise MatvlmError(f"{path}: checkpoint does not match this recipe's model (e.g. {unknown[0]})")
        # Every process read the whole files; under FSDP each keeps its own shard.
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, self.optimizer.optimizer, torch.load(path / "optimizer.pt", weights_only=True),
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), None))
        state = json.loads((path / "state.json").read_text())
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.console.print(f"Resumed from {path} (step {self.step})")

    def save_final(self, seconds: float) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / "final"
        if torch.cuda.is_available():
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
        model = acc.unwrap_model(self.model)
        with self.shared.student_only():
            # Under FSDP every process gathers its shards into one whole state dict (on the main process).
            whole = _whole_state_dict(model) if acc.distributed_type == DistributedType.FSDP else None
            if acc.is_main_process:
                setattr(model.config, HYBRID_KEY, self.block | {"distill_steps": self.step})
                save_hybrid(model, final, source=self.teacher_dir, overwrite=True, state_dict=whole)
        if acc.is_main_process:
            summary = {"steps": self.step, "seconds": round(seconds, 1), "peak_memory": peak, "processes": acc.num_processes,
                       "distributed": acc.distributed_type.value,
                       "skipped_records": dict(self.dataset.skipped.counts)}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self.console.print(f"Distilled {self.step} steps in {seconds:.0f}s, peak memory {peak}. Hybrid saved to [bold]{final}[/bold]")
        acc.wait_for_everyone()
        return final


def launch_processes(num_gpus: int, recipe_path: Path, overrides: list[str], resume: bool) -> int:
    """`--num-gpus N`: the same command under `accelerate launch` with N processes (DDP, or FSDP where
    the recipe says so)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_gpus),
               "-m", "matvlm_cli", "distill", str(recipe_path)]
    command += [arg for text in overrides for arg in ("--set", text)] + (["--resume"] if resume else [])
    return subprocess.call(command)


def run_distill(recipe: DistillRecipe, console: Console | None = None, on_step=None) -> Path:
    run = DistillRun(recipe, console)
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
