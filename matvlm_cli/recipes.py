"""Recipes: plain YAML files validated into typed dataclasses, in one place.

Every subcommand's settings are one dataclass here. `load_recipe` reads YAML, applies overrides
(CLI flags or `key=value` strings) and checks every key and type, collecting all problems into a
single error before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MatvlmError


@dataclass
class ConvertRecipe:
    """`matvlm convert`: which teacher, which layers, where to write the hybrid."""

    teacher: str | None = None  # a local model directory; None = the embedded default
    output: str | None = None  # default: ./<teacher name>-hybrid-<ratio>-<placement>
    ratio: float | None = 0.25
    placement: str = "even"
    layers: list[int] | None = None  # explicit indices; overrides ratio/placement
    count: int | None = None  # how many layers to replace; overrides ratio
    calibration: str | None = None  # placement scored: a LLaVA-format data JSON; None = the embedded world
    calibration_images: str | None = None  # the folder its image paths are relative to (default: the JSON's)
    calibration_records: int = 64  # image records drawn from it (by `seed`) to score the layers on
    keep_bias: bool = False  # carry q/k/v/o biases into in_proj/out_proj (MaTVLM drops them)
    chunk_size: int = 128
    seed: int = 0
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    overwrite: bool = False
    trust_remote_code: bool = False


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _type_ok(value: Any, annotation: Any) -> bool:
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _nested_class(annotation: Any):
    """The dataclass inside `X`, `X | None` or `list[X]`, and whether it is a list."""
    if dataclasses.is_dataclass(annotation):
        return annotation, False
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if len(args) == 1:
        return _nested_class(args[0])
    return None, False


def _collect(cls, values: dict[str, Any], prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    problems += [f"unknown key '{prefix}{key}'" for key in values if key not in known]
    built = {}
    for key, value in values.items():
        if key not in known:
            continue
        nested, is_list = _nested_class(hints[key])
        if nested is not None and value is not None:
            if is_list and isinstance(value, list) and all(isinstance(v, dict) for v in value):
                built[key] = [_collect(nested, v, f"{prefix}{key}[{i}].", problems) for i, v in enumerate(value)]
                continue
            if not is_list and isinstance(value, dict):
                built[key] = _collect(nested, value, f"{prefix}{key}.", problems)
                continue
        if not _type_ok(value, hints[key]):
            problems.append(f"'{prefix}{key}' must be {_type_name(hints[key])}, got {value!r}")
            continue
        built[key] = float(value) if hints[key] in (float, float | None) and isinstance(value, int) else value
    try:
        return cls(**built)
    except TypeError as err:  # a required field without a value
        problems.append(f"{prefix.rstrip('.') or 'recipe'}: {err}")
        return None


@dataclass
class RecipeSource:
    """Where a recipe's values came from: the recipe file, and the command-line options that set keys
    over it (`--seq-len`, `--set training.epochs=0`), so that a problem names what the user typed."""

    file: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # dotted key -> the option that set it

    def __str__(self) -> str:
        return self.file or "options"


# Every problem names the keys it is about in single quotes ('training.epochs'), which is how
# `problems_error` finds the option that set them.
_QUOTED_KEY = re.compile(r"'([A-Za-z_][\w.\[\]]*)'")


def _related(key: str, option_key: str) -> bool:
    """Whether a problem about `key` can come from the option that set `option_key` (the same key, a key
    inside it, or the section holding it)."""
    return key == option_key or key.startswith((option_key + ".", option_key + "[")) or option_key.startswith(key + ".")


def _attribute(problem: str, source: RecipeSource) -> tuple[str | None, str]:
    """(the prefix that says where, the problem's text) for one problem."""
    for key in _QUOTED_KEY.findall(problem):
        for option_key, option in source.options.items():
            if not _related(key, option_key):
                continue
            if key == option_key and not option.startswith("--set "):  # name the flag itself: '--seq-len: 0 ...'
                return None, problem.replace(f"'{key}'", option, 1)
            return option, problem
    return str(source), problem


def problems_error(problems: list[str], source: str | RecipeSource) -> MatvlmError:
    """One MatvlmError for every problem, each under the file, flag or --set its value came from."""
    source = source if isinstance(source, RecipeSource) else RecipeSource(source)
    grouped: dict[str | None, list[str]] = {}
    for problem in problems:
        where, text = _attribute(problem, source)
        grouped.setdefault(where, []).append(text)
    return MatvlmError("; ".join((f"{where}: " if where else "") + "; ".join(texts) for where, texts in grouped.items()))


def build_recipe(cls, values: dict[str, Any], source: str | RecipeSource = "recipe"):
    """Validate `values` against dataclass `cls`; raise one MatvlmError listing every problem."""
    problems: list[str] = []
    recipe = _collect(cls, values, "", problems)
    if problems:
        raise problems_error(problems, source)
    return recipe


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """`optimizer.lr=1e-4` style overrides into a nested mapping."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            raise MatvlmError(f"override {dotted}: '{part}' is not a section")
    values[leaf] = value


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: `5e-4` and `1E3` are numbers, as people write them
    (YAML 1.1 wants a dot and a signed exponent, so PyYAML reads those as strings), and unique keys:
    PyYAML keeps the last of two equal keys, so a second `training:` would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_at: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = first_at.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first at line {first.start_mark.line + 1}", key_node.start_mark,
                    )
        return super().construct_mapping(node, deep)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.2 core schema floats, less the plain integers its regexp also matches (those stay ints).
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML with `RecipeLoader`; a syntax error is a MatvlmError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise MatvlmError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MatvlmError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise MatvlmError(f"{path}: not a text file (byte {err.start} is not UTF-8); a recipe is YAML text") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise MatvlmError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`, with the value read as YAML (so numbers, lists and booleans work)."""
    if "=" not in text:
        raise MatvlmError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip(), parse_yaml(raw, f"override {text!r}")


def load_recipe(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None, sets: list[str] = (),
                flag_names: dict[str, str] | None = None):
    """The recipe file (if any), then `sets` (`--set key=value` texts), then `overrides` (dotted key -> the
    value of a command-line option, None = not given), validated: its types, and the class's own checks
    (`RECIPE_CHECKS`). A problem names the option that set the value it is about: `--key-name`, or the
    name in `flag_names` (key -> flag) where the flag is called otherwise."""
    values = read_yaml(path) if path else {}
    source = RecipeSource(str(path) if path else None)
    for text in sets:
        key, value = parse_override(text)
        set_dotted(values, key, value)
        source.options[key] = f"--set {text}"
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(values, key, value)
            source.options[key] = (flag_names or {}).get(key) or "--" + key.replace("_", "-")
    recipe = build_recipe(cls, values, source)
    if cls in RECIPE_CHECKS:
        RECIPE_CHECKS[cls](recipe, source)
    return recipe


def save_recipe(recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))


@dataclass
class StudentSpec:
    """A converted hybrid directory, or how to convert the teacher on the fly."""

    path: str | None = None
    ratio: float | None = 0.25
    placement: str = "even"
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
    kl_positions: str = "all"  # all | response
    layer_weight: float = 1.0
    layer_loss: str = "l2"  # l2 | mse | cosine
    ce_weight: float = 0.0


@dataclass
class OptimizerSettings:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01  # never on 1-D parameters (A_log, D, dt_bias, norms, biases)
    schedule: str = "wsd"  # wsd (warmup-stable-decay) | cosine | constant
    warmup_steps: int = 0
    decay_steps: int = 0  # wsd: length of the final linear decay
    max_grad_norm: float = 0.1


@dataclass
class TrainingSettings:
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # per device
    gradient_accumulation: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (GPU: fused elementwise work around the matmuls)
    distributed: str = "ddp"  # ddp | fsdp (FSDP2: weights, gradients and optimizer state sharded)
    seed: int = 0
    num_workers: int | None = None  # DataLoader workers decoding images; null = on a GPU one per spare core (up to 8), on a CPU none
    group_by_length: bool = True  # batches of similar length (less padding); false = plain shuffled batches
    # Batch shapes (distill/shapes.py): padded = each batch to its longest record; buckets = to the next of
    # `buckets`; packed = whole records packed into `batch_size` rows of `pack_length` tokens, one shape for
    # every step (the GPU's: docs/distill-shapes.md).
    shapes: str = "padded"
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
    trainable: str | None = None  # null = the recipe's
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
    trainable: str = "mamba"  # mamba | mamba+connector | converted (mixer, norms and MLP of the converted layers) | all
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    trust_remote_code: bool = False
    # Stepwise distillation: empty = one stage (student.layers, training.max_steps and the sections above).
    stages: list[DistillStage] = field(default_factory=list)


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
        from .paths import default_teacher_dir

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
        elif count is not None and any(not 0 <= l < count for l in layers):
            bad = [l for l in layers if not 0 <= l < count]
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
        "losses.kl_positions": (recipe.losses.kl_positions, ("all", "response")),
        "losses.layer_loss": (recipe.losses.layer_loss, ("l2", "mse", "cosine")),
        "trainable": (recipe.trainable, ("mamba", "mamba+connector", "converted", "all")),
        "optimizer.schedule": (recipe.optimizer.schedule, ("wsd", "cosine", "constant")),
    }
    problems += [f"'{key}' must be one of {', '.join(allowed)}, got {value!r}" for key, (value, allowed) in choices.items() if value not in allowed]
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
    if t.shapes not in ("padded", "buckets", "packed"):
        return [f"'training.shapes' must be one of padded, buckets, packed, got {t.shapes!r}"]
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
        "training.precision": (recipe.training.precision, ("fp32", "bf16", "fp16")),
        "training.distributed": (recipe.training.distributed, ("ddp", "fsdp")),
        "student.placement": (recipe.student.placement, ("even", "front", "middle", "back")),
    }
    problems += [f"'{key}' must be one of {', '.join(allowed)}, got {value!r}" for key, (value, allowed) in choices.items() if value not in allowed]
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


@dataclass
class EvaluateRecipe:
    """`matvlm evaluate`: which models, which benchmarks on which data, where the results go."""

    models: list[str] | None = None  # teacher / hybrid directories; None = the embedded teacher
    tasks: list[str] = field(default_factory=lambda: ["pope", "mmmu", "textvqa"])  # aliases or lm-eval task names
    data_dir: str | None = None  # DIR/pope, DIR/mmmu, DIR/textvqa; None = the embedded synthetic sets
    limit: int | None = None  # first N documents of each task (for quick checks)
    batch_size: int = 16
    output: str = "runs/evaluate"
    ocr: bool = False  # TextVQA prompt with the reference OCR tokens (LLaVA-1.5 / TinyLLaVA protocol)
    device: str = "auto"  # cpu | cuda | auto


@dataclass
class BenchRecipe:
    """`matvlm bench`: teacher vs hybrids, same engine, decode speed / memory against the bandwidth floor."""

    teacher: str | None = None  # directory or preset; None = tinyllava-phi2-siglip-3b on GPU, the embedded teacher on CPU
    students: list[str] = field(default_factory=list)  # hybrid directories
    ratios: list[float] | None = None  # convert the teacher in memory; None = [0.25, 0.5] unless students are given
    placement: str = "even"
    seq_lens: list[int] = field(default_factory=lambda: [8192])
    batches: list[int] = field(default_factory=lambda: [1])
    gen_len: int = 128
    engines: list[str] = field(default_factory=lambda: ["graphs", "hf"])  # first one is the fair comparison
    backend: str = "auto"  # mixer kernels: auto | torch | triton | mamba-ssm | fla
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    throughput_seq_lens: list[int] = field(default_factory=list)  # also find each model's largest batch at these lengths (GPU)
    profile: bool = False  # also profile one graph-replayed decode step per model, kernel by kernel
    kernels: bool = False  # kernel micro-benchmark of every installed backend instead of models
    repeats: int = 3
    output: str = "runs/bench"
    device: str = "auto"  # auto | cuda | cpu
    seed: int = 0
    trust_remote_code: bool = False


def check_bench_recipe(recipe: BenchRecipe, source: str | RecipeSource = "recipe") -> None:
    from .kernels import BACKENDS

    problems = []
    if recipe.placement not in ("even", "front", "middle", "back"):
        problems.append(f"'placement' must be one of even, front, middle, back, got {recipe.placement!r}")
    problems += [f"'ratios': {r} is outside (0, 1]" for r in recipe.ratios or [] if not 0 < r <= 1]
    problems += [f"'engines': unknown engine {e!r} (graphs | hf)" for e in recipe.engines if e not in ("graphs", "hf")]
    if not recipe.engines:
        problems.append("'engines' is empty")
    if recipe.backend not in BACKENDS:
        problems.append(f"'backend' must be one of {', '.join(BACKENDS)}, got {recipe.backend!r}")
    if recipe.dtype not in DTYPES:
        problems.append(f"'dtype' must be one of {', '.join(DTYPES)}, got {recipe.dtype!r}")
    if recipe.device not in ("auto", "cuda", "cpu"):
        problems.append(f"'device' must be auto, cuda or cpu, got {recipe.device!r}")
    problems += [f"'seq_lens': {n} must be >= 2" for n in recipe.seq_lens if n < 2]
    problems += [f"'batches': {n} must be >= 1" for n in recipe.batches if n < 1]
    if recipe.gen_len < 2:
        problems.append(f"'gen_len' must be >= 2, got {recipe.gen_len}")
    if recipe.repeats < 1:
        problems.append(f"'repeats' must be >= 1, got {recipe.repeats}")
    problems += [f"'throughput_seq_lens': {n} must be >= 2" for n in recipe.throughput_seq_lens if n < 2]
    problems += [f"'students': {p} is not a model directory" for p in recipe.students if not (Path(p) / "config.json").is_file()]
    if problems:
        raise problems_error(problems, source)


# The checks `load_recipe` runs after the types (convert and evaluate check theirs in their engines).
RECIPE_CHECKS = {DistillRecipe: check_distill_recipe, BenchRecipe: check_bench_recipe}
