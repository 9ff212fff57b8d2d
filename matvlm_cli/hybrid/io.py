"""Reading teachers and reading/writing hybrids: local directories, safetensors only.

A hybrid directory is a normal `save_pretrained` directory of the teacher's architecture whose
config carries a `matvlm` block (replaced layers, mixer dimensions, provenance) and whose
safetensors hold Mamba-2 mixer weights where those layers had attention. `load_hybrid` loads it
with the teacher's class extended to build the mixers, and refuses any missing or extra weight.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

from ..errors import MatvlmError
from .conversion import HYBRID_KEY, build_empty_mixers
from .mixer_config import Mamba2Config
from .stock import check_stock_hybrid

# Everything a processor or tokenizer may need, copied next to the hybrid's weights.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise MatvlmError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise MatvlmError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise MatvlmError(f"{path}: not a model directory (no config.json)")
    return path


def load_config(path: str | os.PathLike, trust_remote_code: bool = False):
    path = check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MatvlmError(f"{path}/config.json: cannot be read as a transformers config: {first_line}") from err


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
    auto_class = model_class_for(config)
    return auto_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def is_hybrid_dir(path: str | os.PathLike) -> bool:
    try:
        return bool(getattr(load_config(path), HYBRID_KEY, None))
    except MatvlmError:
        return False


def load_model(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """A teacher or a hybrid, whichever the directory holds."""
    return load_hybrid(path, **kwargs) if is_hybrid_dir(path) else load_teacher(path, **kwargs)


def hybrid_class(base: type[PreTrainedModel], layers: list[int], mixer_config: Mamba2Config) -> type[PreTrainedModel]:
    """The teacher's class, with mixers installed at construction time.

    Loading through this class lets `from_pretrained` do everything it does for the teacher
    (checkpoint key renaming, sharding, tied weights, dtype, device maps) for the hybrid too.
    It keeps the base's name, so a re-saved config still names the teacher's architecture.
    """

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
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
    base = model_class_for(config)._model_mapping[type(config)]
    cls = hybrid_class(base, block["layers"], Mamba2Config.from_dict(block["mixer"]))
    model, info = cls.from_pretrained(
        path, config=config, dtype=dtype, device_map=device_map, output_loading_info=True,
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
        if source is not None:
            for name in PROCESSOR_FILES:
                src = Path(source) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
    return output


class atomic_directory:
    """Write into a temp directory beside `target`; rename it into place only if all went well."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target, self.overwrite = Path(target), overwrite

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise MatvlmError(f"{self.target}: already exists (pass --overwrite to replace it)")
        if self.target.exists() and not self.target.is_dir():
            raise MatvlmError(f"{self.target}: exists and is not a directory")
        parent = self.target.parent
        if parent.exists() and not parent.is_dir():
            raise MatvlmError(f"{parent}: not a directory")
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.exists():
            trash = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            self.target.rename(trash)
            self.tmp.rename(self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.tmp.rename(self.target)
        return False


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the whole new one, never a half-written one."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp's file is private; results are ordinary files
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
