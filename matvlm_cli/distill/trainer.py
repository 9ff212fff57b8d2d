"""The distillation run: setup, train, checkpoint, resume, final hybrid.

One recipe runs unchanged on one CPU, one GPU or several GPUs: accelerate owns devices, mixed
precision, gradient accumulation and data sharding (`accelerate launch -m matvlm_cli distill ...`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import resource
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..atomic import OUTPUT_MARK, atomic_directory, check_output_dir, lock_directory, mark_output, remove_contents, write_atomic
from ..errors import MatvlmError
from ..families import model_family
from ..hybrid.conversion import HYBRID_KEY, attention_windows, choose_layers, convert_to_hybrid, find_decoder, hybrid_layers
from ..hybrid.load import load_hybrid, load_teacher
from ..hybrid.packed import packed_attention
from ..hybrid.processors import load_processor
from ..hybrid.saving import save_hybrid
from ..recipes import DataSource, DistillRecipe, LossWeights, OptimizerSettings, stage_settings
from .data import ConversationDataset, EpochShuffle, LengthGroupedShuffle, collate
from .prepare import prepare
from .records import SkipReport
from .losses import chunked_logit_losses, layer_loss
from .shapes import PackedBatches, RowsOf, collate_packed, collate_to_bucket, default_buckets, longest_record, packing_problem
from .shared import SharedTeacherStudent
from .throughput import ThroughputMeter, measured_peak_flops

# Whole (unsharded) state, gathered onto the main process's CPU.
WHOLE_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# The frozen weights are held in the autocast dtype (half the memory, no cast at every use); trainable ones
# stay fp32 master weights. Under FSDP everything stays fp32: FSDP2 wants one dtype per unit and casts
# each unit to bf16 itself when it gathers it.
FROZEN_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Reading turns are about 3 % of the embedded world's training turns, so a short distillation sees few
# of them: six more passes over them lifted TextVQA-style from 0.68 to 0.84 after the 700 steps of
# tiny-default.yaml (three: 0.80), with nothing lost elsewhere (docs/distill.md).
EMBEDDED_READING_WEIGHT = 6.0


def embedded_world_sources(console: Console):
    """The embedded world's training conversations, generated once into the cache, plus their reading
    turns again at `EMBEDDED_READING_WEIGHT`."""
    from ..paths import cache_dir
    from ..world import generate_world
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


def lr_factor(schedule: str, step: int, total: int, warmup: int, decay: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    decay_start = total - decay  # warmup-stable-decay
    return 1.0 if step < decay_start else max(0.0, (total - step) / max(1, decay))


@dataclass
class Stage:
    """One stage of the run: steps [start, start + steps), the layers the student runs as Mamba-2 and
    the settings it trains with. A recipe without `stages` is one stage."""

    start: int
    steps: int
    layers: list[int]
    trainable: str
    losses: LossWeights
    optimizer: OptimizerSettings


def stage_plan(recipe: DistillRecipe, layers: list[int], total_steps: int) -> list[Stage]:
    if not recipe.stages:
        return [Stage(0, total_steps, list(layers), recipe.trainable, recipe.losses, recipe.optimizer)]
    plan, start = [], 0
    for stage in recipe.stages:
        plan.append(Stage(start, stage.max_steps, list(stage.layers), *stage_settings(recipe, stage)))
        start += stage.max_steps
    return plan


def stage_index(plan: list[Stage], step: int) -> int:
    """The stage that optimizer step `step` (0-based) belongs to; past the end, the last."""
    return next((i for i, stage in enumerate(plan) if step < stage.start + stage.steps), len(plan) - 1)


def plan_lr_factor(plan: list[Stage], base_lr: float, step: int) -> float:
    """Each stage runs its own schedule over its own steps, at its own lr (a factor of the optimizer's)."""
    stage = plan[stage_index(plan, step)]
    o = stage.optimizer
    factor = lr_factor(o.schedule, step - stage.start, stage.steps, o.warmup_steps, o.decay_steps)
    return factor if o.lr == base_lr else factor * o.lr / base_lr


def build_models(recipe: DistillRecipe, teacher_dir: Path) -> tuple[SharedTeacherStudent, dict]:
    """The student with the teacher's attention beside each Mamba-2 mixer; one copy of the rest."""
    frozen = torch.float32 if recipe.training.distributed == "fsdp" else FROZEN_DTYPE[recipe.training.precision]
    kwargs = {"trust_remote_code": recipe.trust_remote_code, "dtype": frozen}
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
        # A stepwise run converts the last stage's layers (every stage's) up front; see SharedTeacherStudent.
        explicit = recipe.stages[-1].layers if recipe.stages else recipe.student.layers
        layers = choose_layers(len(layout.layers), recipe.student.ratio, recipe.student.placement, explicit,
                               attention_windows(student.config.get_text_config(decoder=True)))
        attentions = {i: layout.attention(i) for i in layers}
        convert_to_hybrid(student, layers, seed=recipe.student.seed, source=str(teacher_dir),
                          ratio=len(layers) / len(layout.layers),
                          placement=None if explicit else recipe.student.placement)
    block = dict(getattr(student.config, HYBRID_KEY)) | {"distilled_from": str(teacher_dir)}
    stages = [(s.layers, s.trainable) for s in stage_plan(recipe, layers, 0)]
    trainables = tuple(trainable for _, trainable in stages)
    separate = load_teacher(teacher_dir, **kwargs) if "all" in trainables else None
    shared = SharedTeacherStudent(student, attentions, trainables[0], separate, trainables[1:])
    if len(stages) > 1:
        shared.set_stage(*stages[0])
    # Every parameter some stage trains: the optimizer holds them (and checkpoints save them) from the start.
    shared.optimized = shared.trainable_in_any(stages)
    for name, param in student.named_parameters():
        if name in shared.optimized:
            param.data = param.data.float()
    return shared, block


def default_workers(processes: int, device: torch.device) -> int:
    """DataLoader workers per process. On an accelerator: the cores left after one per process, at most
    8 (image decoding and the processor's resize then run beside the step). On a CPU the step already
    uses every core: a worker only competes with it (the embedded recipe, 100 steps on 2 cores: 60 s
    without a worker, 62 s with one)."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // processes - 1))


class FinalHiddenStates(nn.Module):
    """Stands in for the LM head during one forward pass: keeps the final hidden states and returns
    logits with no vocabulary (an empty last dimension), so the losses make logits chunk by chunk."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.value = hidden
        return hidden[..., :0]


@contextmanager
def final_hidden_states(model: nn.Module):
    """`model`'s forward returns empty logits while this is open; yields the stand-in that holds the final
    hidden states."""
    head = model.get_output_embeddings()
    stand_in = FinalHiddenStates()
    model.set_output_embeddings(stand_in)
    try:
        yield stand_in
    finally:
        model.set_output_embeddings(head)


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


def param_groups(model: torch.nn.Module, weight_decay: float, keep: set[str] | None = None) -> list[dict]:
    """AdamW groups: no weight decay on 1-D parameters (A_log, D, dt_bias, norms, biases). `keep`: names of
    the parameters to optimise (default: those that require grad)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if (name in keep) if keep is not None else param.requires_grad:
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


CHECKPOINT_FILES = ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")


def _tensors(tree, prefix: str = ""):
    """(name, tensor) for every floating-point tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}[{i}]")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


# What a run writes in output.dir (its mark lists them, so output.overwrite replaces only these).
RUN_ENTRIES = ("recipe.yaml", "log.jsonl", "summary.json", "checkpoints", "final", "tensorboard")


class DistillRun:
    def __init__(self, recipe: DistillRecipe, console: Console | None = None, started_at: float | None = None):
        self.recipe = recipe
        self.console = console or Console()
        self.out = Path(recipe.output.dir)
        self.created_output, self.output_lock = False, None
        self.started_at = started_at if started_at is not None else time.time()

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
        if r.stages and self.accelerator.num_processes > 1:
            raise MatvlmError("stages: a stepwise run trains in one process for now (DDP fixes the trained parameters "
                              "when it wraps the model, and a stage changes them); run it without --num-gpus")
        if self.out.exists() and not self.out.is_dir():
            raise MatvlmError(f"output.dir: {self.out} exists and is not a directory")
        from ..paths import cache_dir, default_teacher_dir

        self.teacher_dir = Path(r.teacher) if r.teacher else default_teacher_dir()
        resume = self._resume_dir()
        replace = self._claim_output(resume) if self.accelerator.is_main_process else False
        processor_dir = Path(r.student.path or self.teacher_dir)
        self.processor = load_processor(processor_dir, trust_remote_code=r.trust_remote_code)
        # The main process generates the embedded world and prepares the data; the others then map its cache.
        with self.accelerator.main_process_first():
            sources = r.data or embedded_world_sources(self.console)
            prepared = prepare(sources, processor_dir, self.processor, r.model_max_length, cache_dir() / "prepared",
                               skip_text_only=r.skip_text_only, trust_remote_code=r.trust_remote_code, console=self.console)
        with self.console.status("Loading teacher and building the student"):
            self.shared, self.block = build_models(r, self.teacher_dir)
        model = self.shared.model
        family = model_family(model.config)  # the loaded config: published layouts (TinyLLaVA) are read, not auto-loaded
        self.dataset = ConversationDataset(prepared, sources, self.processor, seed=r.training.seed,
                                           prefix_lm_token_types=family and family.prefix_lm_token_types)
        self.unreadable = SkipReport()  # records whose image fails to decode when its batch is built
        if self.accelerator.is_main_process:
            where = "prepared into" if prepared.rebuilt else "read from"
            self.console.print(f"data: {len(self.dataset)} records {where} {prepared.directory}")
            for line in self.dataset.skipped.lines():
                self.console.print(f"[yellow]data:[/yellow] {line}")
        if r.training.gradient_checkpointing:
            # transformers 5.24 calls it activation checkpointing and warns on the old name; versions without it keep that.
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        # Packed batches have one shape: compiled for it. Padded and bucketed ones compile once for any length
        # (compiled per bucket, the recompile limit of 8 was reached by the norms after a few buckets).
        regions = self.shared.compile_frozen_parts(dynamic=r.training.shapes != "packed" or None) if r.training.compile else []
        model.train()
        held_out = r.output.eval_samples if r.output.eval_every else 0
        if held_out >= len(self.dataset):
            raise MatvlmError(f"output.eval_samples: {held_out} would hold out all {len(self.dataset)} usable records")
        loader, eval_loader = self._loaders(held_out)
        optimizer = torch.optim.AdamW(param_groups(model, r.optimizer.weight_decay, self.shared.optimized),
                                      lr=r.optimizer.lr, betas=tuple(r.optimizer.betas))
        self.steps_per_epoch = math.ceil(len(loader) / r.training.gradient_accumulation)
        self.total_steps = (sum(s.max_steps for s in r.stages) if r.stages
                            else r.training.max_steps or self.steps_per_epoch * r.training.epochs)
        self.plan = stage_plan(r, self.shared.layers, self.total_steps)
        self.stage = 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(plan_lr_factor, self.plan, r.optimizer.lr))
        # accelerate shards only with several processes; one device runs the same recipe unsharded.
        if self.accelerator.distributed_type == DistributedType.FSDP:
            # Each decoder layer its own FSDP unit, so the layer loss can call a converted layer alone.
            plugin = self.accelerator.state.fsdp_plugin
            plugin.transformer_cls_names_to_wrap = fsdp_units(model, self.shared.decoder_layer(self.shared.layers[0]))
        # MFU's basis (throughput.py), counted and measured before the model is wrapped.
        matmul_dtype = FROZEN_DTYPE[r.training.precision]
        self.meter = ThroughputMeter(self.started_at, 6 * self.shared.teacher_parameters(),
                                     measured_peak_flops(self.accelerator.device, matmul_dtype), self.accelerator.num_processes, regions)
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(model, optimizer, loader, scheduler)
        self.eval_loader = self.accelerator.prepare(eval_loader) if eval_loader is not None else None
        if self.shared.teacher_connector is not None:
            self.shared.teacher_connector.to(self.accelerator.device)
        if self.shared.separate_teacher is not None:
            self.shared.separate_teacher.to(self.accelerator.device)
        for block in self.shared.teacher_blocks.values():
            block.to(self.accelerator.device)
        self.capture = LayerCapture({idx: self.shared.teacher_layer(idx) for idx in self.shared.layers})
        # Gemma 2's tanh soft-capping of the logits, which the chunked losses apply after the head.
        self.logit_softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        if resume is not None:
            self._load_checkpoint(resume)
        self._enter_stage(stage_index(self.plan, self.step))
        if self.accelerator.is_main_process:
            if replace:  # only now that models and data are ready: a run that fails before this keeps the old one
                remove_contents(self.out)
            mark_output(self.out, RUN_ENTRIES)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(asdict(r), sort_keys=False))

    def _claim_output(self, resume: Path | None) -> bool:
        """Check output.dir before any work, then create it and lock it: one run writes to it at a time (a
        second would interleave log.jsonl and race for `final`). True when its old contents are to be replaced:
        output.overwrite, on a folder matvlm wrote, that holds none of the run's inputs."""
        r, out = self.recipe, self.out
        if r.output.resume == "auto" and resume is None and out.is_dir() and any(p.name != OUTPUT_MARK for p in out.iterdir()):
            raise MatvlmError(
                f"--resume: {out} has no checkpoint to resume from (output.save_every is {r.output.save_every}); "
                "run without --resume to start again (output.overwrite: true replaces it), or choose another output.dir"
            )
        occupied = out.is_dir() and any(out.iterdir())
        fresh = r.output.resume is None
        if fresh and occupied and not r.output.overwrite:
            raise MatvlmError(f"output.dir: {out} already exists (set output.resume: auto to continue, or output.overwrite: true)")
        replace = fresh and occupied
        models = (self.teacher_dir, *([r.student.path] if r.student.path else []))
        data = tuple(path for d in r.data for path in (d.json, d.image_root))
        check_output_dir(out, "output.dir", exists_ok=not replace, overwrite=replace, inputs=models, data_inputs=data)
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MatvlmError(f"output.dir: {out} cannot be made: {err.strerror or err}") from None
        self.output_lock = lock_directory(out, "output.dir")
        self.created_output = created  # only once it is ours: a run refused the lock removes nothing
        return replace

    def release_output(self) -> None:
        if self.output_lock is not None:
            os.close(self.output_lock)
            self.output_lock = None

    def _loaders(self, held_out: int) -> tuple[DataLoader, DataLoader | None]:
        """The training and held-out loaders, batching as `training.shapes` says (shapes.py)."""
        r, t = self.recipe, self.recipe.training
        pad = self.processor.tokenizer.pad_token_id
        workers = t.num_workers if t.num_workers is not None else default_workers(self.accelerator.num_processes, self.accelerator.device)
        # Images are decoded in the workers, a few batches ahead of the step.
        loading = {"num_workers": workers, "persistent_workers": workers > 0, "prefetch_factor": 4 if workers else None}
        train_set, eval_set = Subset(self.dataset, range(held_out, len(self.dataset))), Subset(self.dataset, range(held_out))
        lengths = self.dataset.lengths
        if t.shapes == "packed":
            model = self.shared.model
            why = packing_problem(model_family(model.config), self.dataset.reader.images, model.config.get_text_config(decoder=True))
            if why:
                raise MatvlmError(f"training.shapes: packed: this teacher's records cannot share rows ({why}); use buckets")
            row_length = t.pack_length or r.model_max_length
            record, longest = longest_record(self.dataset, range(len(self.dataset)))
            if longest > row_length:
                raise MatvlmError(f"training.pack_length: {row_length} tokens is shorter than record {record} ({longest} tokens, "
                                  f"the longest); set it to at least {longest}, or to null for model_max_length")
            collate_rows = functools.partial(collate_packed, pad_id=pad, rows=t.batch_size, row_length=row_length, longest=r.model_max_length)
            loader = DataLoader(RowsOf(train_set), batch_sampler=PackedBatches(lengths[held_out:], t.batch_size, row_length, t.seed),
                                collate_fn=collate_rows, **loading)
            eval_batches = PackedBatches(lengths[:held_out], t.batch_size, row_length, t.seed, shuffle=False)
            return loader, DataLoader(RowsOf(eval_set), batch_sampler=eval_batches, collate_fn=collate_rows) if held_out else None
        if t.shapes == "buckets":
            collate_fn = functools.partial(collate_to_bucket, pad_id=pad, buckets=t.buckets or default_buckets(r.model_max_length))
        else:
            collate_fn = functools.partial(collate, pad_id=pad)
        if t.group_by_length:
            sampler = LengthGroupedShuffle(lengths[held_out:], t.seed, t.batch_size)
        else:
            sampler = EpochShuffle(len(train_set), t.seed)
        loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, collate_fn=collate_fn, **loading)
        return loader, DataLoader(eval_set, batch_size=t.batch_size, collate_fn=collate_fn) if held_out else None

    def _enter_stage(self, index: int) -> None:
        """From here on the student runs the stage's layers as Mamba-2 and trains what it says."""
        stage = self.plan[index]
        self.stage = index
        self.shared.set_stage(stage.layers, stage.trainable)
        if len(self.plan) > 1 and self.accelerator.is_main_process:
            self.console.print(f"stage {index + 1}/{len(self.plan)} from step {stage.start}: layers {stage.layers}, "
                               f"trainable {stage.trainable}, {stage.steps} steps")

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
        real, padded = 0, 0  # tokens since the last log line, for its padding fraction
        step_tokens, step_slots = 0, 0  # since the last optimizer step, all processes
        self.meter.start()
        with progress:
            task = progress.add_task("distill", total=self.total_steps, completed=self.step, stats="")
            while self.step < self.total_steps:
                # Through the prepared loader: accelerate's own iteration counter would otherwise reset the
                # sampler's epoch at every `iter()`, and that counter starts again at 0 after a resume.
                self.loader.set_epoch(self.epoch)
                loader = acc.skip_first_batches(self.loader, self.batch_in_epoch) if self.batch_in_epoch else self.loader
                step_at_epoch_start = self.step
                for batch in loader:
                    self.batch_in_epoch += 1
                    if not self._usable(batch):
                        continue
                    if stage_index(self.plan, self.step) != self.stage:
                        self._enter_stage(stage_index(self.plan, self.step))
                    with acc.accumulate(self.model):
                        parts = self._losses(batch)
                        total = sum(w * parts[k] for k, w in self._weights().items() if w)
                        if not torch.isfinite(total):
                            raise MatvlmError(
                                f"loss became {total.item()} at step {self.step + 1}; stopped. "
                                f"Last good checkpoint: {self._latest_checkpoint() or 'none'}. {self._nonfinite_advice()}"
                            )
                        acc.backward(total)
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(self.model.parameters(), self.plan[self.stage].optimizer.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    in_batch = int(batch["attention_mask"].sum())
                    tokens += in_batch * acc.num_processes
                    real, padded = real + in_batch, padded + batch["attention_mask"].numel()
                    step_tokens += in_batch * acc.num_processes
                    step_slots += batch["attention_mask"].numel() * acc.num_processes
                    if not acc.sync_gradients:
                        continue
                    self.scheduler.step()
                    self.step += 1
                    # Mean over processes, so a multi-GPU log reads like a single-process one.
                    logged = {k: acc.reduce(v.detach(), "mean") for k, v in (parts | {"loss": total}).items()}
                    stats = {k: round(v.item(), 5) for k, v in logged.items()}
                    speed = self.meter.step(self.step, step_tokens, step_slots, acc.device)
                    step_tokens, step_slots = 0, 0
                    stats |= {"lr": self.scheduler.get_last_lr()[0], "tokens_per_s": round(tokens / (time.time() - started)),
                              "padding": round(1 - real / max(1, padded), 4), "tokens": tokens} | speed
                    if len(self.plan) > 1:
                        stats["stage"] = self.stage
                    progress.update(task, completed=self.step, stats="  ".join(
                        [f"{k} {v:.4f}" for k, v in stats.items() if k in ("loss", "kl", "layer", "ce")]
                        + [f"lr {stats['lr']:.2e}", f"{stats['tokens_per_s']} tok/s"]))
                    if r.output.eval_every and (self.step % r.output.eval_every == 0 or self.step == self.total_steps):
                        stats |= self.evaluate()
                    # The first step and the end of the 10-60 window are logged whatever log_every says.
                    if (self.step % r.output.log_every == 0 or self.step == self.total_steps or "eval_loss" in stats
                            or "seconds_to_first_step" in stats or "tokens_per_s_10_60" in stats):
                        acc.log(stats, step=self.step)
                        if log:
                            log.write(json.dumps({"step": self.step, "epoch": self.epoch} | stats) + "\n")
                            log.flush()
                        real, padded = 0, 0
                    if r.output.save_every and self.step % r.output.save_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if on_step:
                        on_step(self.step)
                    if self.step >= self.total_steps:
                        break
                else:
                    if self.step == step_at_epoch_start:
                        raise MatvlmError(f"data: a whole epoch gave no usable batch ({'; '.join(self.unreadable.lines())})")
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    continue
                break
        if log:
            log.close()
        final = self.save_final(time.time() - started)
        # Last: accelerate's end_training also destroys the process group that save_final waits on.
        acc.end_training()
        return final

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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss components over the held-out records (every process takes its share)."""
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for batch in self.eval_loader:
            if not self._usable(batch):
                continue
            parts = self._losses(batch)
            parts["loss"] = sum(w * parts[k] for k, w in self._weights().items() if w)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.detach()
            batches += 1
        return {f"eval_{k}": round(self.accelerator.reduce(v / batches, "mean").item(), 5) for k, v in sums.items()}

    def _weights(self) -> dict[str, float]:
        l = self.plan[self.stage].losses
        return {"kl": l.kl_weight, "layer": l.layer_weight, "ce": l.ce_weight}

    def _losses(self, batch) -> dict[str, torch.Tensor]:
        if "seq_idx" not in batch.get("model_inputs", ()):
            return self._packed_or_padded_losses(batch)
        # Packed rows: every text decoder attends within records (hybrid/packed.py). The number of records
        # changes from batch to batch: compiled attention takes their boundaries at any length, rather than
        # compiling once per count (dynamo does not make a dimension reached through **kwargs dynamic itself).
        torch._dynamo.mark_dynamic(batch["cu_seq_lens_q"], 0)
        with packed_attention(*self.shared.text_decoders()):
            return self._packed_or_padded_losses(batch)

    def _packed_or_padded_losses(self, batch) -> dict[str, torch.Tensor]:
        l = self.plan[self.stage].losses
        # No cache: a training forward never continues from it, and building one per pass made torch.compile
        # recompile on its state (issue 25).
        inputs = {k: batch[k] for k in ("input_ids", *batch.get("model_inputs", ())) if k in batch} | {"use_cache": False}
        student_model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), self.shared.teacher_path(self.model) as teacher:
            teacher_model = self.accelerator.unwrap_model(teacher)
            teacher_head = teacher_model.get_output_embeddings()
            with final_hidden_states(teacher_model) as teacher_hidden:
                self.capture.active = True
                teacher(**inputs)
                self.capture.active = False
        student_head = student_model.get_output_embeddings()
        with final_hidden_states(student_model) as student_hidden:
            self.model(**inputs)
        mask = batch["attention_mask"].bool()
        parts = {}
        if l.kl_weight or l.ce_weight:
            positions = (mask if l.kl_positions == "all" else batch["labels"] != -100) if l.kl_weight else None
            with self.accelerator.autocast():  # the heads run outside the prepared model's forward
                parts |= chunked_logit_losses(
                    student_head, teacher_head, student_hidden.value, teacher_hidden.value, positions,
                    batch["labels"] if l.ce_weight else None, l.kl_temperature, softcap=self.logit_softcap,
                )
        if l.layer_weight:
            distances = []
            for idx in self.shared.active:
                args, kwargs = self.capture.calls[idx]
                layer = self.shared.decoder_layer(idx)
                with self.accelerator.autocast():  # the prepared model's forward autocasts; this call is outside it
                    student_out = _first(layer(*args, **kwargs))
                distances.append(layer_loss(student_out, self.capture.outputs[idx], mask, l.layer_loss))
            parts["layer"] = torch.stack(distances).mean()
        return parts

    def _nonfinite_advice(self) -> str:
        precision = self.recipe.training.precision
        if precision == "fp32":
            return "Lower optimizer.lr, or optimizer.max_grad_norm."
        return f"Lower optimizer.lr, or use training.precision: fp32 (it is {precision})."

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
        weights = {n: _whole(p) for n, p in model.named_parameters() if n in self.shared.optimized}
        optimizer = get_optimizer_state_dict(model, self.optimizer.optimizer, options=WHOLE_ON_MAIN)
        # Only a checkpoint whose weights and optimizer state are finite is written, so the newest one is
        # always a good one to resume from (an update can turn the weights to inf while its loss was finite).
        bad = next((n for n, t in _tensors({"weights": weights, "optimizer": optimizer}) if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise MatvlmError(
                f"non-finite values in {bad} after step {self.step}; stopped. Last good checkpoint: "
                f"{self._latest_checkpoint() or 'none'}. {self._nonfinite_advice()}"
            )
        if acc.is_main_process:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_directory(target, overwrite=True) as tmp:
                save_file(weights, tmp / "trainable.safetensors")
                torch.save(optimizer, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save({"torch": torch.get_rng_state(), "python": random.getstate()[1]}, tmp / "rng.pt")
                (tmp / "state.json").write_text(json.dumps({"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                                                            "stage": stage_index(self.plan, self.step)}))
            for old in self._checkpoints()[: -self.recipe.output.keep_checkpoints or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def _load_checkpoint(self, path: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        if missing:
            raise MatvlmError(f"output.resume: {path} is not a checkpoint of matvlm distill (no {', '.join(missing)})")
        try:
            weights = load_file(path / "trainable.safetensors")
            optimizer = torch.load(path / "optimizer.pt", weights_only=True)
            scheduler = torch.load(path / "scheduler.pt", weights_only=True)
            rng = torch.load(path / "rng.pt", weights_only=True)
            state = json.loads((path / "state.json").read_text())
        except Exception as err:  # truncated or corrupt: safetensors, zip and JSON each fail their own way
            raise MatvlmError(f"output.resume: {path} is truncated or corrupt ({type(err).__name__}: {err})") from None
        unknown = sorted(set(weights) - {n for n, _ in model.named_parameters()})
        if unknown:
            raise MatvlmError(f"{path}: checkpoint does not match this recipe's model (e.g. {unknown[0]})")
        # Every process read the whole files; under FSDP each keeps its own shard.
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, self.optimizer.optimizer, optimizer, options=StateDictOptions(full_state_dict=True))
        # Loading first gives every parameter that requires grad a zero state (torch's _init_optim_state); one that
        # had none when the checkpoint was written (a later stage's, not trained yet) must have none again.
        names = {id(p): n for n, p in model.named_parameters()}
        for param in [p for p in self.optimizer.optimizer.state if names.get(id(p)) not in optimizer["state"]]:
            del self.optimizer.optimizer.state[param]
        self.scheduler.load_state_dict(scheduler)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), None))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.console.print(f"Resumed from {path} (step {self.step})")

    def discard_unfinished_output(self) -> None:
        """After a failure: an output directory this run created and left with nothing to resume from
        (no checkpoint, no final hybrid) is removed, so the same command can simply be run again."""
        if self.created_output and self.out.is_dir() and not self._checkpoints() and not (self.out / "final").exists():
            shutil.rmtree(self.out, ignore_errors=True)

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
                stages = {"distill_stages": [{"layers": s.layers, "steps": s.steps, "trainable": s.trainable} for s in self.plan]}
                setattr(model.config, HYBRID_KEY, self.block | {"distill_steps": self.step} | (stages if len(self.plan) > 1 else {}))
                save_hybrid(model, final, source=self.teacher_dir, overwrite=True, state_dict=whole)
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
        run.discard_unfinished_output()
        raise
    finally:
        run.release_output()
