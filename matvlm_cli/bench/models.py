"""The models a bench compares, built one at a time, and their prompts.

Speed does not depend on the weights, so a teacher may be a *preset*: a bundled config of a real
architecture built with random weights directly on the device (no download). Hybrids come from a
directory, or from converting the teacher in memory at a ratio. Only one model is resident at a
time, so each one's peak memory is its own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import AutoConfig

from ..choices import BENCH_PRESETS as PRESETS  # architectures to time, not models to use
from ..errors import MatvlmError
from ..families import model_family
from ..hybrid import choose_layers, convert_to_hybrid, load_model
from ..hybrid.checks import check_model
from ..hybrid.conversion import HYBRID_KEY, attention_windows
from ..hybrid.layouts import load_config, model_class_for
from ..hybrid.stock import is_stock_hybrid
from ..paths import PRESETS_DIR, default_teacher_dir
from .engines import BenchInputs


@dataclass
class ModelSpec:
    label: str  # "teacher", "hybrid-0.25", or a directory name
    build: Callable[[], torch.nn.Module]
    directory: Path | None = None  # where its image processor is read from (a converted hybrid: the teacher's)


def default_teacher(device: torch.device) -> str:
    """The paper's teacher shape on a GPU; the embedded tiny teacher on a CPU."""
    return "tinyllava-phi2-siglip-3b" if device.type == "cuda" else str(default_teacher_dir())


def check_teacher(spec: str) -> None:
    if spec in PRESETS:
        return
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise MatvlmError(f"teacher {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a model directory")


def check_models(teacher: str, students: list[str], lengths: list[int], trust_remote_code: bool = False) -> None:
    """Before anything is timed: every model directory is readable (config, weight headers, image processor) and
    holds the longest context asked for. A preset is exempt from the length check: its random weights are an
    architecture to time at any length, not a model whose answers beyond its trained positions matter."""
    for path in students:  # a speedup of a model without Mamba-2 layers over its teacher means nothing
        config = load_config(path, trust_remote_code)
        if not (getattr(config, HYBRID_KEY, None) or is_stock_hybrid(config)):
            raise MatvlmError(
                f"{path}: --student takes a hybrid, and this model has no Mamba-2 layers (no '{HYBRID_KEY}' block in "
                "its config.json); time it as --teacher, or convert it first"
            )
    directories = ([] if teacher in PRESETS else [teacher]) + list(students)
    for path in directories:
        # bench prompts are token ids, so only the image processor is needed (read in `image_input`)
        check_model(path, trust_remote_code, processor=False)
        image_processor(load_config(path, trust_remote_code), path)
        limit = getattr(load_config(path, trust_remote_code).get_text_config(decoder=True), "max_position_embeddings", None)
        if limit is not None and max(lengths) > limit:
            raise MatvlmError(
                f"{path}: a context of {max(lengths)} tokens (--seq-len plus --gen-len) is beyond its "
                f"max_position_embeddings of {limit}: shorten --seq-len (or --gen-len), or time a preset teacher"
            )


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the GPU's free memory, or the machine's available
    memory within the container's limit (cgroup v2 or v1), which the machine-wide figure does not show."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # accelerate's own dependency

    free = psutil.virtual_memory().available
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max" means no limit
            free = min(free, int(limit) - usage)
    return free


def check_memory(teacher: str, students: list[str], device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool = False) -> None:
    """Before any model is built: the largest one's weights fit in what is free on `device`. One model is
    resident at a time, but a 7B teacher in float32 on a 16 GiB machine would be killed by the kernel after
    minutes, with no message."""
    sizes = {}
    for spec in [teacher, *students]:
        config = AutoConfig.from_pretrained(PRESETS_DIR / spec) if spec in PRESETS else load_config(spec, trust_remote_code)
        with torch.device("meta"):
            model = model_class_for(config).from_config(config, trust_remote_code=trust_remote_code)
        sizes[spec] = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    spec, need = max(sizes.items(), key=lambda item: item[1])
    free = free_memory(device)
    if need > free:
        where = "the GPU" if device.type == "cuda" else "this machine"
        ways = [*(["a GPU (--device cuda)"] if device.type == "cpu" else []), *(["--dtype bfloat16"] if dtype.itemsize > 2 else [])]
        raise MatvlmError(
            f"{spec}: its weights alone take {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, and "
            f"{where} has {free / 2**30:.1f} GiB free; use {', '.join(ways + ['a smaller model'])}".replace(", a smaller", " or a smaller")
        )


def teacher_dir(spec: str) -> Path:
    """A preset's bundled directory, or the model directory itself."""
    return PRESETS_DIR / spec if spec in PRESETS else Path(spec)


def build_teacher(spec: str, device: torch.device, dtype: torch.dtype, seed: int = 0, trust_remote_code: bool = False):
    """A preset with seeded random weights, or a model directory, on `device` in `dtype`."""
    if spec in PRESETS:
        config = AutoConfig.from_pretrained(PRESETS_DIR / spec)
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_class_for(config).from_config(config, dtype=dtype)
        return model.eval()
    model = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def model_specs(
    teacher: str, students: list[str], ratios: list[float], placement: str, device: torch.device,
    dtype: torch.dtype, seed: int = 0, trust_remote_code: bool = False,
) -> list[ModelSpec]:
    """Teacher first, then each hybrid directory, then the teacher converted at each ratio."""

    def teacher_model():
        return build_teacher(teacher, device, dtype, seed, trust_remote_code)

    def converted(ratio: float):
        def build():
            model = teacher_model()
            windows = attention_windows(model.config.get_text_config(decoder=True))
            layers = choose_layers(len(windows), ratio=ratio, placement=placement, windows=windows)
            convert_to_hybrid(model, layers, seed=seed)
            return model

        return build

    def from_dir(path: str):
        return lambda: load_model(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()

    source = teacher_dir(teacher)
    specs = [ModelSpec("teacher", teacher_model, source)]
    # distill writes OUT/final, so a directory called "final" is labelled by its run
    specs += [ModelSpec(Path(path).name if Path(path).name != "final" else Path(path).resolve().parent.name, from_dir(path), Path(path))
              for path in students]
    specs += [ModelSpec(f"hybrid-{ratio:g}", converted(ratio), source) for ratio in ratios]
    return specs


SYNTHETIC_IMAGE = (640, 480)  # width, height of the image every prompt holds: a 4:3 camera frame


@dataclass
class ImageInput:
    """One image as the model's own processor makes it, and the tokens it takes in the prompt."""

    tensors: dict[str, torch.Tensor]  # the image processor's output for the image, the forward's keywords only
    tokens: int  # image-token ids the prompt must hold for it (what get_image_features returns)


def _preprocessor_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))


def image_processor(config, directory: str | Path | None = None):
    """The image processor of a model: the directory's own (preprocessor_config.json, or the one inside
    processor_config.json) when it has one, otherwise its family's with defaults derived from the
    config; None for a family not described (then a square tensor of the tower's size is used)."""
    if directory is not None and _preprocessor_files(Path(directory)):
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(directory)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MatvlmError(f"{directory}: its image processor cannot be built: {str(err).splitlines()[0]}") from None
    family = model_family(config)
    return family.image_processor(config) if family is not None and family.image_processor is not None else None


def synthetic_image(size: tuple[int, int] = SYNTHETIC_IMAGE, seed: int = 0):
    from PIL import Image

    generator = np.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _keywords(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _count_features(features) -> int:
    """Rows of what get_image_features returns: a tensor, a list of per-image tensors, or an output
    whose pooler_output is one of those."""
    features = getattr(features, "pooler_output", None) if not isinstance(features, (torch.Tensor, list, tuple)) else features
    tensors = [features] if isinstance(features, torch.Tensor) else list(features)
    return sum(t.reshape(-1, t.shape[-1]).shape[0] for t in tensors)


@torch.no_grad()
def image_input(model, directory: str | Path | None = None, size: tuple[int, int] = SYNTHETIC_IMAGE, seed: int = 0) -> ImageInput | None:
    """The model's image input for one synthetic image of `size`, from its real image processor; None for
    a text-only model. The token count is what the model's own get_image_features gives for it."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    family = model_family(config)
    processor = image_processor(config, directory)
    if processor is None:  # an undescribed family: a square image of the tower's size
        side = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        tensors = {"pixel_values": torch.zeros(1, 3, side, side)}
    else:
        extra = family.image_kwargs if family is not None else {}
        output = processor(images=[synthetic_image(size, seed)], return_tensors="pt", **extra)
        accepted = _keywords(model.forward)
        tensors = {k: v for k, v in output.items() if isinstance(v, torch.Tensor) and k in accepted}
    tensors = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in tensors.items()}
    wanted = _keywords(model.get_image_features)
    features = model.get_image_features(**{k: v for k, v in tensors.items() if k in wanted})
    return ImageInput({k: v.cpu() for k, v in tensors.items()}, _count_features(features))


def image_token_count(model, directory: str | Path | None = None) -> int:
    """How many tokens one image becomes in the prompt."""
    image = image_input(model, directory)
    return 0 if image is None else image.tokens


def special_token_ids(config) -> set[int]:
    """Every id the config names as a special token (image, video, boundaries, padding...)."""
    ids = set()
    for cfg in (config, config.get_text_config(decoder=True)):
        for key, value in cfg.to_dict().items():
            if key.endswith(("_token_id", "_token_index")) and isinstance(value, int):
                ids.add(value)
    return ids


def bench_inputs(model, seq_len: int, batch: int, image: ImageInput | None, seed: int = 0) -> BenchInputs:
    """`batch` prompts of `seq_len` tokens: the image's tokens, then random text tokens; each row's image
    tensors are the same image's, batched as the processor batches them (concatenated on dim 0)."""
    config = model.config
    text_config = config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    tokens = image.tokens if image is not None else 0
    if tokens >= seq_len:
        raise MatvlmError(f"--seq-len {seq_len} is too short: one image alone takes {tokens} tokens")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, text_config.vocab_size, (batch, seq_len), generator=generator)
    special = special_token_ids(config)
    filler = next(i for i in range(10, text_config.vocab_size) if i not in special)
    ids[torch.isin(ids, torch.tensor(sorted(special) or [-1]))] = filler
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(config, "image_token_index", None)
    extra: dict[str, torch.Tensor] = {}
    token_types: dict[str, torch.Tensor] = {}
    positions = offsets = None
    if tokens:
        ids[:, :tokens] = image_token
        for key, value in image.tensors.items():
            value = torch.cat([value] * batch) if value.dim() else value
            if key == "pixel_values" and image.tensors.keys() == {"pixel_values"}:  # no processor: noise, as before
                value = torch.randn(value.shape, generator=generator).to(value.dtype)
            extra[key] = value.to(device)
        family = model_family(config)
        if family is not None and family.image_token_types:
            token_types[family.image_token_types] = (ids == image_token).int().to(device)
        ids = ids.to(device)
        if family is not None and family.positions is not None:
            positions, offsets = family.positions(model, ids, {**extra, **token_types})
    return BenchInputs(ids.to(device), extra.get("pixel_values"), extra, token_types, positions, offsets, tokens)
