"""`matvlm distill`'s recipe: its sections, stages, and the checks run before any model is loaded."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..choices import (
    Distributed,
    KlPositions,
    LayerLoss,
    Placement,
    Precision,
    Schedule,
    Shapes,
    Trainable,
    choices,
)
from .loading import RecipeSource, _collect, problems_error


def choice_problems(settings: dict[str, tuple[Any, Any]]) -> list[str]:
    """{key: (value, its Literal)} -> a problem for each value that is not one of its choices."""
    return [f"'{key}' must be one of {', '.join(choices(kind))}, got {value!r}"
            for key, (value, kind) in settings.items() if value not in choices(kind)]

@dataclass
class StudentSpec:
    """A converted hybrid directory, or how to convert the teacher on the fly."""

    path: str | None = None
    ratio: float | None = 0.25
    placement: Placement = "even"
    layers: list[int] | None = None
    seed: int = 0


@dataclass
class DataSource:
    json: str  # a LLaVA-format JSON list
    image_root: str  # the folder `image` paths are relative to
    weight: float = 1.0  # 1.0 = one pass over this source per epoch


@dataclass
class LossWeights:
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    kl_positions: KlPositions = "all"
    layer_weight: float = 1.0
    layer_loss: LayerLoss = "l2"
    ce_weight: float = 0.0


@dataclass
class OptimizerSettings:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01  # never on 1-D parameters (A_log, D, dt_bias, norms, biases)
    schedule: Schedule = "wsd"  # wsd = warmup-stable-decay
    warmup_steps: int = 0
    decay_steps: int = 0  # wsd: length of the final linear decay
    max_grad_norm: float = 0.1


@dataclass
class TrainingSettings:
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # per device
    gradient_accumulation: int = 1
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (GPU: fused elementwise work around the matmuls)
    distributed: Distributed = "ddp"  # fsdp = FSDP2: weights, gradients and optimizer state sharded)
    seed: int = 0
    num_workers: int | None = None  # DataLoader workers decoding images; null = on a GPU one per spare core (up to 8), on a CPU none
    group_by_length: bool = True  # batches of similar length (less padding); false = plain shuffled batches
    # Batch shapes (distill/shapes.py): padded = each batch to its longest record; buckets = to the next of
    # `buckets`; packed = whole records packed into `batch_size` rows of `pack_length` tokens, one shape for
    # every step (the GPU's: docs/distill-shapes.md).
    shapes: Shapes = "padded"
    buckets: list[int] | None = None  # shapes: buckets; null = eighths of model_max_length
    pack_length: int | None = None  # shapes: packed; tokens per row; null = model_max_length


@dataclass
class OutputSettings:
    dir: str = "runs/distill"
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10  # log.jsonl, and TensorBoard (output.dir/tensorboard) when it is installed
    eval_every: int = 0  # steps; held-out distillation losses; 0 = never
    eval_samples: int = 64  # records held out of training for those evaluations (only when eval_every > 0)
    resume: str | None = None  # null | auto | a checkpoint directory
    overwrite: bool = False


# What a stage may change of the recipe's optimizer settings (betas and weight decay live in the
# optimizer's parameter groups, built once for the whole run).
STAGE_OPTIMIZER_KEYS = ("lr", "schedule", "warmup_steps", "decay_steps", "max_grad_norm")


@dataclass
class DistillStage:
    """One stage of a stepwise distillation (MambaInLlama: 25 % then 50 %, then end-to-end)."""

    layers: list[int]  # the layers converted so far: each stage keeps the previous stage's and may add more
    max_steps: int
    trainable: Trainable | None = None  # null = the recipe's
    losses: dict[str, Any] | None = None  # keys of `losses` that change for this stage; the rest are the recipe's
    optimizer: dict[str, Any] | None = None  # lr, schedule, warmup_steps, decay_steps, max_grad_norm for this stage


@dataclass
class DistillRecipe:
    """`matvlm distill`: teacher -> hybrid distillation (MaTVLM's losses; docs/distill.md)."""

    teacher: str | None = None  # a local model directory; None = the embedded default
    student: StudentSpec = field(default_factory=StudentSpec)
    data: list[DataSource] = field(default_factory=list)  # empty = the embedded world's training set
    model_max_length: int = 2048
    skip_text_only: bool = False  # LLaVA-1.5 and ShareGPT4V train on text-only records too; true skips them
    losses: LossWeights = field(default_factory=LossWeights)
    trainable: Trainable = "mamba"  # converted = mixer, norms and MLP of the converted layers
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    trust_remote_code: bool = False
    # Stepwise distillation: empty = one stage (student.layers, training.max_steps and the sections above).
    stages: list[DistillStage] = field(default_factory=list)

    def check(self, source: str | RecipeSource = "recipe") -> None:
        check_distill_recipe(self, source)


def stage_settings(recipe: DistillRecipe, stage: DistillStage, problems: list[str] | None = None, where: str = "stage"):
    """(trainable, LossWeights, OptimizerSettings) of one stage: the recipe's, with the stage's changes."""
    problems = [] if problems is None else problems
    losses = _collect(LossWeights, dataclasses.asdict(recipe.losses) | (stage.losses or {}), f"{where}.losses.", problems)
    changed = stage.optimizer or {}
    problems += [f"'{where}.optimizer.{key}' cannot change per stage (only {', '.join(STAGE_OPTIMIZER_KEYS)})"
                 for key in changed if key not in STAGE_OPTIMIZER_KEYS]
    optimizer = _collect(OptimizerSettings, dataclasses.asdict(recipe.optimizer) | changed, f"{where}.optimizer.", problems)
    return stage.trainable or recipe.trainable, losses, optimizer


def teacher_layer_count(teacher: str | None) -> int | None:
    """The teacher's number of decoder layers, from its config.json alone (no model is loaded)."""
    import json

    if teacher is None:
        from ..paths import default_teacher_dir

        config_path = default_teacher_dir() / "config.json"
    else:
        config_path = Path(teacher) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    for section in (config.get("text_config") or {}, config.get("llm_config") or {}, config):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(section.get(key), int):
                return section[key]
    return None


def _check_stages(recipe: DistillRecipe) -> list[str]:
    problems: list[str] = []
    count = teacher_layer_count(recipe.teacher)
    previous: list[int] = []
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        layers = stage.layers
        if not layers:
            problems.append(f"'{where}.layers' is empty")
        elif any(b <= a for a, b in zip(layers, layers[1:])):
            problems.append(f"'{where}.layers' {layers} must be in ascending order without repeats")
        elif count is not None and any(not 0 <= layer < count for layer in layers):
            bad = [layer for layer in layers if not 0 <= layer < count]
            problems.append(f"'{where}.layers': {bad} out of range for the teacher's {count} layers (0..{count - 1})")
        elif not set(previous) <= set(layers):
            dropped = sorted(set(previous) - set(layers))
            problems.append(f"'{where}.layers' {layers} drops layer(s) {dropped} of stages[{i - 1}]: a stage keeps every layer converted before it")
        if layers:
            previous = layers
        if stage.max_steps < 1:
            problems.append(f"'{where}.max_steps' must be >= 1, got {stage.max_steps}")
        trainable, losses, optimizer = stage_settings(recipe, stage, problems, where)
        if losses is not None and optimizer is not None:
            effective = dataclasses.replace(recipe, trainable=trainable, losses=losses, optimizer=optimizer, stages=[])
            problems += [f"{where}: {p}" for p in _training_problems(effective)
                         if (stage.losses or stage.optimizer or stage.trainable)]
    if recipe.stages:
        total = sum(stage.max_steps for stage in recipe.stages)
        if recipe.training.max_steps is not None and recipe.training.max_steps != total:
            problems.append(f"'training.max_steps' is {recipe.training.max_steps} but the stages add up to {total} steps (set it to null or {total})")
        if recipe.student.path is not None:
            problems.append("'stages': the student is converted from the teacher stage by stage; 'student.path' cannot be used with stages")
        if recipe.student.layers is not None and recipe.stages[-1].layers and recipe.student.layers != recipe.stages[-1].layers:
            problems.append(f"'student.layers' {recipe.student.layers} differs from the last stage's {recipe.stages[-1].layers} (set it to null)")
    return problems


def _training_problems(recipe: DistillRecipe) -> list[str]:
    """The checks of the settings a stage can change: trainable, losses, optimizer."""
    problems = []
    choices = {
        "losses.kl_positions": (recipe.losses.kl_positions, KlPositions),
        "losses.layer_loss": (recipe.losses.layer_loss, LayerLoss),
        "trainable": (recipe.trainable, Trainable),
        "optimizer.schedule": (recipe.optimizer.schedule, Schedule),
    }
    problems += choice_problems(choices)
    if recipe.losses.kl_weight == recipe.losses.layer_weight == recipe.losses.ce_weight == 0:
        problems.append("'losses': every weight is 0, nothing to learn")
    if not (math.isfinite(recipe.losses.kl_temperature) and recipe.losses.kl_temperature > 0):
        problems.append("'losses.kl_temperature' must be > 0")
    optimizer = recipe.optimizer
    if not (math.isfinite(optimizer.lr) and optimizer.lr > 0):
        problems.append(f"'optimizer.lr' must be a finite number > 0, got {optimizer.lr}")
    if len(optimizer.betas) != 2 or not all(0 <= beta < 1 for beta in optimizer.betas):
        problems.append(f"'optimizer.betas' must be two numbers in [0, 1), got {optimizer.betas}")
    if not (math.isfinite(optimizer.weight_decay) and optimizer.weight_decay >= 0):
        problems.append(f"'optimizer.weight_decay' must be a finite number >= 0, got {optimizer.weight_decay}")
    if not optimizer.max_grad_norm > 0:  # inf is allowed: no clipping
        problems.append(f"'optimizer.max_grad_norm' must be > 0, got {optimizer.max_grad_norm}")
    if optimizer.warmup_steps < 0 or optimizer.decay_steps < 0:
        problems.append("'optimizer.warmup_steps' and 'optimizer.decay_steps' must be >= 0")
    weights = {name: getattr(recipe.losses, name) for name in ("kl_weight", "layer_weight", "ce_weight")}
    problems += [f"'losses.{name}' must be a finite number >= 0, got {value}" for name, value in weights.items()
                 if not (math.isfinite(value) and value >= 0)]
    return problems


def _shape_problems(recipe: DistillRecipe) -> list[str]:
    t, longest = recipe.training, recipe.model_max_length
    if t.shapes not in choices(Shapes):
        return [f"'training.shapes' must be one of {', '.join(choices(Shapes))}, got {t.shapes!r}"]
    problems = []
    if t.buckets is not None:
        if t.shapes != "buckets":
            problems.append(f"'training.buckets' is read with training.shapes: buckets only (shapes is {t.shapes})")
        elif not t.buckets or any(b < 1 for b in t.buckets) or any(b <= a for a, b in zip(t.buckets, t.buckets[1:])):
            problems.append(f"'training.buckets' must be lengths >= 1 in ascending order, got {t.buckets}")
        elif t.buckets[-1] < longest:
            problems.append(f"'training.buckets': the longest bucket ({t.buckets[-1]}) does not cover model_max_length "
                            f"({longest}); records up to {longest} tokens would have no bucket (add {longest})")
    if t.pack_length is not None:
        if t.shapes != "packed":
            problems.append(f"'training.pack_length' is read with training.shapes: packed only (shapes is {t.shapes})")
        elif t.pack_length < 1:
            problems.append(f"'training.pack_length' must be >= 1, got {t.pack_length}")
    return problems


def check_distill_recipe(recipe: DistillRecipe, source: str | RecipeSource = "recipe") -> None:
    """Impossible combinations and missing files, before any model is loaded."""
    problems = _training_problems(recipe)
    choices = {
        "training.precision": (recipe.training.precision, Precision),
        "training.distributed": (recipe.training.distributed, Distributed),
        "student.placement": (recipe.student.placement, Placement),
    }
    problems += choice_problems(choices)
    problems += [f"'training.{key}' must be >= 1, got {getattr(recipe.training, key)}"
                 for key in ("batch_size", "gradient_accumulation", "epochs") if getattr(recipe.training, key) < 1]
    if recipe.training.num_workers is not None and recipe.training.num_workers < 0:
        problems.append(f"'training.num_workers' must be >= 0 (0 loads data in the training process), got {recipe.training.num_workers}")
    problems += _shape_problems(recipe)
    output = recipe.output
    if output.eval_every < 0 or (output.eval_every and output.eval_samples < 1):
        problems.append("'output.eval_every' must be >= 0, with 'output.eval_samples' >= 1")
    if output.log_every < 1:
        problems.append(f"'output.log_every' must be >= 1, got {output.log_every}")
    if output.save_every < 0:
        problems.append(f"'output.save_every' must be >= 0 (0 = only at the end), got {output.save_every}")
    if output.keep_checkpoints < 1:
        problems.append(f"'output.keep_checkpoints' must be >= 1 (resuming needs one), got {output.keep_checkpoints}")
    if not output.dir.strip():
        problems.append("'output.dir' is empty")
    problems += _check_stages(recipe)
    if recipe.training.max_steps is not None and recipe.training.max_steps < 1:
        problems.append("'training.max_steps' must be >= 1")
    if recipe.student.ratio is not None and not 0 < recipe.student.ratio <= 1:
        problems.append(f"'student.ratio': {recipe.student.ratio} is outside (0, 1]")
    for key, path in (("teacher", recipe.teacher), ("student.path", recipe.student.path)):
        if path is not None and not (Path(path) / "config.json").is_file():
            problems.append(f"'{key}': {path} is not a model directory")
    for i, data in enumerate(recipe.data):
        if not Path(data.json).is_file():
            problems.append(f"'data[{i}].json': {data.json} not found")
        if not Path(data.image_root).is_dir():
            problems.append(f"'data[{i}].image_root': {data.image_root} is not a directory")
        if not (math.isfinite(data.weight) and data.weight > 0):
            problems.append(f"'data[{i}].weight' must be a finite number > 0")
    resume = recipe.output.resume
    if resume not in (None, "auto") and not Path(resume).is_dir():
        problems.append(f"'output.resume': {resume} is not a checkpoint directory")
    if problems:
        raise problems_error(problems, source)
