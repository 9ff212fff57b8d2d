"""Loading teachers and hybrids: local directories, safetensors only.

A hybrid directory is a normal `save_pretrained` directory of the teacher's architecture whose
config carries a `matvlm` block (replaced layers, mixer dimensions, provenance) and whose
safetensors hold Mamba-2 mixer weights where those layers had attention. `load_hybrid` loads it
with the teacher's class extended to build the mixers, and refuses any missing or extra weight.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..errors import MatvlmError
from .checks import resolve_device
from .conversion import HYBRID_KEY, build_empty_mixers, find_decoder
from .layouts import FILE_ERRORS, LayoutReader, first_line, layout_reader, load_config, model_class_for, weight_files
from .mixer_config import Mamba2Config
from .stock import check_stock_hybrid
from .tinyllava import HEAD_BIAS_KEY


def _from_pretrained(cls, path: Path, **kwargs):
    """`cls.from_pretrained` on checked files, from safetensors only; what still goes wrong (weights of
    the wrong shape, a config value the model cannot use) is a one-line error naming the directory."""
    weight_files(path)
    try:
        return cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except (*FILE_ERRORS, RuntimeError) as err:
        raise MatvlmError(f"{path}: cannot be loaded as {cls.__name__}: {first_line(err)}") from None


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
        raise MatvlmError(f"{path}: weights do not fit the model read from config.json: {first_line(err)}") from None
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
