"""Reading teachers and reading/writing hybrids: local directories, safetensors only.

Directories published in another layout (TinyLLaVA's, MaTVLM's releases) are read through a
`LayoutReader`, here and nowhere else, so every subcommand takes them as it takes a transformers one.

A hybrid directory is a normal `save_pretrained` directory of the teacher's architecture whose
config carries a `matvlm` block (replaced layers, mixer dimensions, provenance) and whose
safetensors hold Mamba-2 mixer weights where those layers had attention. `load_hybrid` loads it
with the teacher's class extended to build the mixers, and refuses any missing or extra weight.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

from ..atomic import atomic_directory, check_output_dir, write_atomic  # noqa: F401 (the subcommands take them from here)
from ..errors import MatvlmError
from . import tinyllava
from .conversion import HYBRID_KEY, build_empty_mixers, find_decoder
from .mixer_config import Mamba2Config
from .stock import check_stock_hybrid
from .tinyllava import HEAD_BIAS_KEY

# Everything a processor or tokenizer may need, copied next to the hybrid's weights.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True)
class LayoutReader:
    """A model directory published in a layout other than transformers' own, read as a transformers model:
    `config(path, weight_files)` gives its transformers config (with a matvlm block for a hybrid),
    `state_dict(path, weight_files, config, model_keys, attention_name)` its weights under the model's names,
    `processor(path)` its processor."""

    name: str
    identifies: Callable[[Path], bool]
    config: Callable
    state_dict: Callable
    processor: Callable


LAYOUT_READERS = (
    LayoutReader("MaTVLM hybrid", tinyllava.is_matvlm_release_dir, tinyllava.matvlm_release_config,
                 tinyllava.tinyllava_state_dict, tinyllava.tinyllava_processor),
    LayoutReader("TinyLLaVA", tinyllava.is_tinyllava_dir, tinyllava.tinyllava_config,
                 tinyllava.tinyllava_state_dict, tinyllava.tinyllava_processor),
)


def layout_reader(path: str | os.PathLike) -> LayoutReader | None:
    """The reader for a directory in a published non-transformers layout, or None for a transformers one."""
    return next((reader for reader in LAYOUT_READERS if reader.identifies(Path(path))), None)


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise MatvlmError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise MatvlmError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise MatvlmError(f"{path}: not a model directory (no config.json)")
    return path


def _first_line(err: BaseException) -> str:
    """The part of a library's message that says what is wrong: its first sentence (a strict config's
    validation error says it on its last line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return re.split(r"(?<=\.)\s", lines[-1] if isinstance(err, StrictDataclassError) else lines[0])[0]


# What reading a user's config, processor or weights raises when the files are wrong (transformers'
# configs are strict dataclasses: a wrong-typed value is a StrictDataclassError).
_FILE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OSError, StrictDataclassError, SafetensorError)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def load_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """The directory's config, with its matvlm block (if any) checked against the model it describes."""
    path = check_model_dir(path)
    if reader := layout_reader(path):
        config = reader.config(path, weight_files(path))
    else:
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except _FILE_ERRORS as err:
            raise MatvlmError(f"{path}/config.json: cannot be read as a transformers config: {_first_line(err)}") from None
    if getattr(config, HYBRID_KEY, None):
        check_hybrid_block(path, config)
    return config


def check_hybrid_block(path: Path, config) -> None:
    """A hand-edited or foreign matvlm block fails here, naming what is wrong, rather than deep inside
    model building: its layers must be distinct decoder layers the model has, its mixer a Mamba2Config."""
    block, where = getattr(config, HYBRID_KEY), f"{path}/config.json: '{HYBRID_KEY}'"
    layers = block.get("layers") if isinstance(block, dict) else None
    count = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise MatvlmError(f"{where}.layers must be a list of layer indices, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise MatvlmError(f"{where}.layers {layers} names a layer twice")
    missing = [i for i in layers if isinstance(count, int) and not 0 <= i < count]
    if missing:
        raise MatvlmError(f"{where}.layers names layer {missing[0]}, which the model lacks (its {count} decoder layers are 0..{count - 1})")
    try:
        Mamba2Config.from_dict(block["mixer"])
    except (KeyError, TypeError, ValueError) as err:
        raise MatvlmError(f"{where}.mixer is not a Mamba-2 mixer's settings: {_first_line(err)}") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The directory's safetensors files, each checked readable (header and length); pickle weights are
    refused, never loaded: unpickling runs code from the file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise MatvlmError(f"{index}: not a safetensors index ({_first_line(err)})") from None
        files = [path / name for name in names]
    else:
        files = [path / "model.safetensors"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        pickles = [name for name in PICKLE_WEIGHTS if (path / name).is_file()] or sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            raise MatvlmError(
                f"{path}: has only pickle weights ({pickles[0]}), and matvlm reads safetensors only. If you trust the "
                f"file, convert it once: python -c \"from transformers import AutoModelForImageTextToText as M; "
                f"M.from_pretrained('{path}').save_pretrained('{path}')\" (AutoModelForCausalLM for a text-only model)"
            )
        raise MatvlmError(f"{missing[0]}: not found (config.json is there, the weights are not)")
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise MatvlmError(f"{file}: not a readable safetensors file ({_first_line(err)})") from None
    return files


def _from_pretrained(cls, path: Path, **kwargs):
    """`cls.from_pretrained` on checked files, from safetensors only; what still goes wrong (weights of
    the wrong shape, a config value the model cannot use) is a one-line error naming the directory."""
    weight_files(path)
    try:
        return cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except (*_FILE_ERRORS, RuntimeError) as err:
        raise MatvlmError(f"{path}: cannot be loaded as {cls.__name__}: {_first_line(err)}") from None


def _torchvision_missing() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return True
    return False


@functools.cache
def images_only(processor_class: type) -> type:
    """`processor_class` as matvlm builds it. Without torchvision, whose only user in these processors is
    the video processor, processors that also take videos (Qwen-VL, InternVL, LLaVA-OneVision, SmolVLM)
    cannot even be built. matvlm gives them images only: a subclass of the same name (saved folders name the
    stock class) that declares no video processor among its parts. Build it with `video_processor=None`;
    a video passed to one fails. With torchvision installed, or for a class without a video processor,
    this is the class itself."""
    takes_video = "video_processor" in inspect.signature(processor_class.__init__).parameters
    if not takes_video or not _torchvision_missing():
        return processor_class
    parts = processor_class.get_attributes.__func__

    def get_attributes(cls):
        return [part for part in parts(cls) if part != "video_processor"]

    return type(processor_class.__name__, (processor_class,), {
        "get_attributes": classmethod(get_attributes), "__module__": processor_class.__module__,
        "__qualname__": processor_class.__qualname__, "built_without_video": True})


def _saved_processor_class(path: Path) -> type | None:
    """The stock processor class a folder's processor_config.json names, if transformers has it."""
    import transformers

    config = path / "processor_config.json"
    try:
        name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    except (OSError, ValueError):
        return None
    return getattr(transformers, name, None) if isinstance(name, str) else None


def render_chat(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The processor's chat template rendered as text. A processor built without its video processor (see
    `images_only`) renders through ProcessorMixin's own method: SmolVLM's override
    reads the video processor's frame settings even for a chat of images, and adds nothing else for one."""
    from transformers import ProcessorMixin

    built_without_video = getattr(type(processor), "built_without_video", False)
    render = ProcessorMixin.apply_chat_template.__get__(processor) if built_without_video else processor.apply_chat_template
    return render(messages, add_generation_prompt=add_generation_prompt)


def on_pil(processor):
    """The processor with its image processor on transformers' PIL backend. A saved image processor does
    not record its backend, and transformers loads the torchvision one wherever torchvision is installed,
    whose resize gives other pixels (the GPU machine's TinyLLaVA round trip differed by 1e-3 in the
    logits): matvlm reads every directory on PIL, so a model preprocesses alike on every machine."""
    import transformers

    image_processor = getattr(processor, "image_processor", None)
    backends = [base.__name__ for base in type(image_processor).__mro__]
    if image_processor is None or "TorchvisionBackend" not in backends:
        return processor
    pil_class = getattr(transformers, type(image_processor).__name__.removesuffix("Fast") + "Pil", None)
    if pil_class is not None:
        processor.image_processor = pil_class.from_dict(image_processor.to_dict())
    return processor


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False):
    """The directory's processor (tokenizer, image processor on PIL, chat template)."""
    from transformers import AutoProcessor

    if reader := layout_reader(path):
        return reader.processor(Path(path))
    try:
        stock = _saved_processor_class(Path(path))
        if stock is not None and images_only(stock) is not stock:
            return on_pil(images_only(stock).from_pretrained(path, video_processor=None))
        return on_pil(AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code))
    except _FILE_ERRORS as err:
        raise MatvlmError(f"{path}: no usable processor (preprocessor_config.json, tokenizer files): {_first_line(err)}") from None


def check_model(path: str | os.PathLike, trust_remote_code: bool = False, processor: bool = True,
                images_for: str | None = None) -> None:
    """Everything about a teacher or hybrid directory that can be checked without reading its weights:
    the config, the architecture built on the meta device, the weight files' headers and (unless
    `processor` is False: bench reads no text, only images) the processor. `images_for` (what needs
    images, e.g. "generate"): a text-only model is refused, rather than failing on its processor."""
    config = load_config(path, trust_remote_code)
    if images_for and model_class_for(config) is not AutoModelForImageTextToText:
        architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
        raise MatvlmError(f"{path}: a text-only model ({architecture}); {images_for} needs a vision-language model")
    try:
        with torch.device("meta"):
            model_class_for(config).from_config(config, trust_remote_code=trust_remote_code)
    except (*_FILE_ERRORS, RuntimeError) as err:
        raise MatvlmError(f"{path}/config.json: the model cannot be built from it: {_first_line(err)}") from None
    weight_files(path)
    if processor:
        load_processor(path, trust_remote_code)


def model_class_for(config):
    """Image-text-to-text for VLMs, causal LM for text-only decoders."""
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto_class._model_mapping:
            return auto_class
    raise MatvlmError(
        f"unsupported architecture {config.model_type!r}: not a transformers image-text-to-text or causal LM model"
    )


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when visible, else CPU), `cuda` or `cpu`; asking for an absent GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MatvlmError("--device cuda: no CUDA GPU is available (use cpu or auto)")
    return torch.device(device)


def load_teacher(path: str | os.PathLike, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False) -> PreTrainedModel:
    config = load_config(path, trust_remote_code)
    if getattr(config, HYBRID_KEY, None):
        raise MatvlmError(f"{path}: is already a matvlm hybrid; give the original teacher")
    check_stock_hybrid(path, config)
    if reader := layout_reader(path):
        return _load_from_layout(reader, Path(path), config, dtype)
    auto_class = model_class_for(config)
    if getattr(config, HEAD_BIAS_KEY, False):
        # A teacher saved after it was read from another layout: its class builds the head without the bias.
        base = auto_class._model_mapping[type(config)]
        return _from_pretrained(hybrid_class(base, [], None), Path(path), dtype=dtype).eval()
    return _from_pretrained(auto_class, Path(path), dtype=dtype, trust_remote_code=trust_remote_code)


def _load_from_layout(reader: LayoutReader, path: Path, config, dtype, device_map=None) -> PreTrainedModel:
    """Build the transformers model (a hybrid's mixers included) from the config, then fill it with the
    reader's mapping of the folder's weights; every weight of the model must come from the folder."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older 5.x releases keep it here
        from transformers.modeling_utils import no_init_weights

    files = weight_files(path)
    block = getattr(config, HYBRID_KEY, None)
    base = model_class_for(config)._model_mapping[type(config)]
    layers, mixer = (block["layers"], Mamba2Config.from_dict(block["mixer"])) if block else ([], None)
    cls = hybrid_class(base, layers, mixer)
    with torch.device("meta"):
        skeleton = cls(config)
    targets = set(skeleton.state_dict())
    # Only a hybrid's mixer weights need the decoder's attention name; a teacher need not be convertible.
    attention_name = find_decoder(skeleton).attention_name if block else None
    state = reader.state_dict(path, files, config, targets, attention_name)
    if dtype == "auto":
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise MatvlmError(f"{path}: the weights lack {len(missing)} of the model's tensors, e.g. {missing[:3]} "
                          f"(read as a {reader.name} folder)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MatvlmError(f"{path}: weights do not fit the model read from config.json: {_first_line(err)}") from None
    del state
    if device_map is not None:  # one device: the weights are already in memory, there is nothing to dispatch
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if len(devices) != 1:
            raise MatvlmError(f"{path}: a {reader.name} folder loads onto one device, not a device map over {sorted(map(str, devices))}")
        device = devices.pop()
        model = model.to(resolve_device(device) if device == "auto" else device)
    return model.eval()


def is_hybrid_dir(path: str | os.PathLike) -> bool:
    try:
        return bool(getattr(load_config(path), HYBRID_KEY, None))
    except MatvlmError:
        return False


def load_model(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """A teacher or a hybrid, whichever the directory holds."""
    return load_hybrid(path, **kwargs) if is_hybrid_dir(path) else load_teacher(path, **kwargs)


def add_head_bias(model: PreTrainedModel) -> None:
    """Give the output head the bias its config records (HEAD_BIAS_KEY): a Phi head inside a LLaVA, whose
    own head is built without one; dropping it would change every logit."""
    head = model.get_output_embeddings()
    if getattr(model.config, HEAD_BIAS_KEY, False) and head is not None and head.bias is None:
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features, device=head.weight.device, dtype=head.weight.dtype))


def hybrid_class(base: type[PreTrainedModel], layers: list[int], mixer_config: Mamba2Config) -> type[PreTrainedModel]:
    """The teacher's class, with mixers installed at construction time.

    Loading through this class lets `from_pretrained` do everything it does for the teacher
    (checkpoint key renaming, sharding, tied weights, dtype, device maps) for the hybrid too.
    It keeps the base's name, so a re-saved config still names the teacher's architecture.
    The head gets the bias its config records (`add_head_bias`); with no layers the class is the
    teacher's own with only that, for teachers read from another layout.
    """

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        add_head_bias(self)
        if layers:
            build_empty_mixers(self, layers, mixer_config)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def load_hybrid(
    path: str | os.PathLike, dtype: str | torch.dtype = "auto", device_map=None, trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a hybrid written by `convert` (or `distill`). The result works with `generate()`."""
    config = load_config(path, trust_remote_code)
    block = getattr(config, HYBRID_KEY, None)
    if not block:
        raise MatvlmError(f"{path}: not a matvlm hybrid (config.json has no '{HYBRID_KEY}' block)")
    if reader := layout_reader(path):
        return _load_from_layout(reader, Path(path), config, dtype, device_map)
    base = model_class_for(config)._model_mapping[type(config)]
    cls = hybrid_class(base, block["layers"], Mamba2Config.from_dict(block["mixer"]))
    model, info = _from_pretrained(
        cls, Path(path), config=config, dtype=dtype, device_map=device_map, output_loading_info=True,
        trust_remote_code=trust_remote_code,
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(v)[:3]}" for k, v in problems.items())
        raise MatvlmError(f"{path}: weights do not match the hybrid's structure ({detail})")
    return model.eval()


def save_hybrid(model: PreTrainedModel, output: str | os.PathLike, source: str | os.PathLike | None = None,
                overwrite: bool = False, state_dict: dict | None = None) -> Path:
    """Write the model (whose config already carries the matvlm block) atomically to `output`,
    with the tokenizer/processor files copied from `source`. `state_dict` replaces the model's own
    weights, e.g. when they are sharded across processes."""
    output = Path(output)
    with atomic_directory(output, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if source is not None and (reader := layout_reader(source)):
            # The source has no processor files of its own: write the one it is read with.
            reader.processor(Path(source)).save_pretrained(tmp)
        elif source is not None:
            for name in PROCESSOR_FILES:
                src = Path(source) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
    return output
