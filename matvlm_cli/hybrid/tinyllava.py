"""TinyLLaVA checkpoints and MaTVLM's released hybrids, read as they are published (the layouts in
docs/paper.md), as a stock transformers LLaVA: none of their own code runs.

A TinyLLaVA folder (config.json with model_type "tinyllava", safetensors shards, Phi-2's vocab.json and
merges.txt, no processor config) becomes a `LlavaForConditionalGeneration` whose forward is TinyLLaVA's:
- its SigLIP tower and Linear-GELU(erf)-Linear connector are LLaVA's vision tower and projector;
  `vision_feature_select_strategy "default"` drops the first token of `hidden_states[-2]`, which is what
  TinyLLaVA's "patch" does (SigLIP has no CLS token; TinyLLaVA drops a patch all the same);
- its single image id (-200, outside the vocabulary) becomes an added `<image>` token that the processor
  expands to one token per image feature;
- Phi-2's output head keeps its bias: LLaVA's head is built without one, so the config records it under
  `HEAD_BIAS_KEY` and the loader adds the parameter (see `io.add_head_bias`);
- images get the plain "square" resize with SigLIP's normalisation, prompts TinyLLaVA's 'phi' template.

A MaTVLM release is that folder plus `mamba_config.json` and `...layers.i.mamba.*` in place of those layers'
attention; it becomes a matvlm hybrid with the mixers mapped into this project's Mamba-2 layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from tokenizers import AddedToken
from transformers import AutoConfig, CodeGenTokenizer, LlavaConfig, LlavaProcessor, SiglipImageProcessorPil

from ..errors import MatvlmError
from .conversion import HYBRID_KEY, hybrid_block
from .mixer_config import Mamba2Config

TINYLLAVA_MODEL_TYPE = "tinyllava"
MAMBA_CONFIG_FILE = "mamba_config.json"
# LLaVA's lm_head has no bias and no config field for one; this config key says the model has one.
HEAD_BIAS_KEY = "lm_head_bias"
KNOWN_CONNECTORS = ("mlp2x_gelu",)
KNOWN_VISION_TOWERS = ("siglip_vision_model",)
KNOWN_ASPECT_RATIOS = ("square",)
# TinyLLaVA's feature selection, in LLaVA's words: "patch" drops the first token, "cls_patch" keeps all.
FEATURE_SELECTION = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN = "<image>"
END_OF_TEXT = "<|endoftext|>"

PHI_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# TinyLLaVA's 'phi' template: system + " ", each user turn "USER: " + content + " " (with an image:
# "<image>\n" + the stripped question), each answer "ASSISTANT: " + answer + "<|endoftext|>"; a prompt for
# generation ends in "ASSISTANT:".
PHI_CHAT_TEMPLATE = (
    "{{ '" + PHI_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}"
    "{% set text = message['content'] %}{% set images = text.count('<image>') %}"
    "{% set text = text.replace('<image>', '') %}"
    "{% else %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "USER: {% if images %}{{ '<image>\n' * images }}{{ text | trim }}{% else %}{{ text }}{% endif %} "
    "{% elif message['role'] == 'assistant' %}"
    "ASSISTANT: {{ text }}<|endoftext|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise MatvlmError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise MatvlmError(f"{file}: expected a JSON object")
    return data


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None


def is_tinyllava_dir(path) -> bool:
    return _model_type(path) == TINYLLAVA_MODEL_TYPE and not (Path(path) / MAMBA_CONFIG_FILE).is_file()


def is_matvlm_release_dir(path) -> bool:
    return _model_type(path) == TINYLLAVA_MODEL_TYPE and (Path(path) / MAMBA_CONFIG_FILE).is_file()


def _weight_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Every weight's shape, from the files' headers alone."""
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            shapes |= {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    return shapes


def _weight_keys(files: list[Path]) -> list[str]:
    return list(_weight_shapes(files))


def _sub_config(raw: dict, name: str, file: Path):
    sub = raw.get(name)
    if not isinstance(sub, dict) or "model_type" not in sub:
        raise MatvlmError(f"{file}: {name} is missing or has no model_type (TinyLLaVA writes the whole config there)")
    # Its own auto_map points at the hub's remote code, which a saved hybrid must not inherit.
    fields = {k: v for k, v in sub.items() if k not in ("model_type", "transformers_version", "architectures", "auto_map")}
    try:
        return AutoConfig.for_model(sub["model_type"], **fields)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise MatvlmError(f"{file}: {name}.model_type {sub['model_type']!r} cannot be read ({err})") from None


def tinyllava_tokenizer(path: Path):
    """Phi-2's CodeGen BPE from the folder's files, plus the `<image>` token LLaVA needs as a real id."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise MatvlmError(f"{path / name}: not found (a TinyLLaVA folder holds Phi-2's vocab.json and merges.txt)")
    raw = _read_json(path / "config.json")
    try:
        tokenizer = CodeGenTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MatvlmError(f"{path}/vocab.json: cannot be read as a CodeGen tokenizer ({err})") from None
    # Whole and untouched, so the text on either side of it is tokenised alone, as TinyLLaVA splits at it.
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)],
                         special_tokens=True)
    tokenizer.pad_token = raw.get("pad_token") or END_OF_TEXT
    tokenizer.model_max_length = raw.get("tokenizer_model_max_length") or tokenizer.model_max_length
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    tokenizer.chat_template = PHI_CHAT_TEMPLATE
    return tokenizer


def tinyllava_config(path: Path, files: list[Path]) -> LlavaConfig:
    """The LlavaConfig whose model computes what TinyLLaVA's does; unsupported parts are refused by name."""
    path = Path(path)
    file = path / "config.json"
    raw = _read_json(file)
    for field, known in (("connector_type", KNOWN_CONNECTORS), ("image_aspect_ratio", KNOWN_ASPECT_RATIOS)):
        value = raw.get(field, known[0] if field == "image_aspect_ratio" else None)
        if value not in known:
            raise MatvlmError(f"{file}: {field} {value!r} is not supported (matvlm reads {', '.join(known)})")
    vision = _sub_config(raw, "vision_config", file)
    if vision.model_type not in KNOWN_VISION_TOWERS:
        raise MatvlmError(f"{file}: vision_config.model_type {vision.model_type!r} is not supported "
                          f"(matvlm reads {', '.join(KNOWN_VISION_TOWERS)})")
    text = _sub_config(raw, "text_config", file)
    strategy = raw.get("vision_feature_select_strategy", "patch")
    if strategy not in FEATURE_SELECTION:
        raise MatvlmError(f"{file}: vision_feature_select_strategy {strategy!r} is not one of {', '.join(FEATURE_SELECTION)}")
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise MatvlmError(f"{file}: vision_feature_layer {layer!r} is not an integer")

    keys = _weight_keys(files)
    # Some vision towers are saved without SigLIP's pooling head, which the image features never use.
    if not any(".head." in k for k in keys if k.startswith("vision_tower.")):
        vision.vision_use_head = False
    image_token_id = tinyllava_tokenizer(path).convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= text.vocab_size:
        raise MatvlmError(f"{file}: text_config.vocab_size {text.vocab_size} leaves no id for the image token "
                          f"(the tokenizer's {IMAGE_TOKEN} is id {image_token_id})")
    patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=layer, vision_feature_select_strategy=FEATURE_SELECTION[strategy],
        image_seq_length=patches - (strategy == "patch"), projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    setattr(config, HEAD_BIAS_KEY, "language_model.lm_head.bias" in keys)
    return config


def tinyllava_processor(path: Path) -> LlavaProcessor:
    """SigLIP's processor as TinyLLaVA builds it from the vision model's name (the folder has no
    preprocessor_config.json): a plain square resize, bicubic, 1/255, mean = std = 0.5."""
    path = Path(path)
    raw = _read_json(path / "config.json")
    vision = _sub_config(raw, "vision_config", path / "config.json")
    size = vision.image_size
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size}, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tinyllava_tokenizer(path), patch_size=vision.patch_size,
        vision_feature_select_strategy=FEATURE_SELECTION.get(raw.get("vision_feature_select_strategy", "patch"), "default"),
        num_additional_image_tokens=0, image_token=IMAGE_TOKEN, chat_template=PHI_CHAT_TEMPLATE,
    )


# ------------------------------------------------------------------------------------- MaTVLM releases

def _mamba_layers_in(keys) -> list[int]:
    found = set()
    for key in keys:
        parts = key.split(".")
        if key.startswith("language_model.model.layers.") and len(parts) > 4 and parts[4] == "mamba":
            found.add(int(parts[3]))
    return sorted(found)


def matvlm_release_mixer(path: Path, text_config) -> tuple[list[int], Mamba2Config, int]:
    """(Mamba layers, this project's mixer config, MaTVLM's d_xb) from mamba_config.json."""
    file = Path(path) / MAMBA_CONFIG_FILE
    raw = _read_json(file)
    ssm = raw.get("ssm_cfg") or {}
    try:
        n_layer, d_model, d_inner, d_xb = (int(raw[k]) for k in ("n_layer", "d_model", "d_inner", "d_xb"))
        attn_layers = [int(i) for i in raw["attn_layers"]]
        ngroups, d_state = int(ssm["ngroups"]), int(ssm["d_state"])
    except (KeyError, TypeError, ValueError) as err:
        raise MatvlmError(f"{file}: field {err} is missing or not a number") from None
    if n_layer != text_config.num_hidden_layers:
        raise MatvlmError(f"{file}: n_layer {n_layer} disagrees with config.json's text_config.num_hidden_layers "
                          f"{text_config.num_hidden_layers}")
    if d_model != text_config.hidden_size:
        raise MatvlmError(f"{file}: d_model {d_model} disagrees with text_config.hidden_size {text_config.hidden_size}")
    if ngroups * d_state != d_inner or d_xb <= 0 or d_inner % d_xb or d_xb % d_state:
        raise MatvlmError(f"{file}: d_inner {d_inner}, d_xb {d_xb} and ssm_cfg (ngroups {ngroups}, d_state {d_state}) "
                          f"do not fit together (d_inner = ngroups * d_state, d_xb a multiple of d_state)")
    bad = [i for i in attn_layers if not 0 <= i < n_layer]
    if bad:
        raise MatvlmError(f"{file}: attn_layers {bad} out of range for {n_layer} layers")
    layers = [i for i in range(n_layer) if i not in attn_layers]
    if not layers:
        raise MatvlmError(f"{file}: attn_layers lists every layer, so there are no Mamba layers")
    # MaTVLM's heads: one per group, headdim = d_state; x and B are widened to d_inner on load.
    mixer = Mamba2Config(d_model=d_model, nheads=ngroups, headdim=d_state, d_state=d_state, ngroups=ngroups)
    return layers, mixer, d_xb


def matvlm_release_config(path: Path, files: list[Path]) -> LlavaConfig:
    config = tinyllava_config(path, files)
    layers, mixer, d_xb = matvlm_release_mixer(path, config.text_config)
    file = Path(path) / MAMBA_CONFIG_FILE
    shapes = _weight_shapes(files)
    in_weights = _mamba_layers_in(shapes)
    if in_weights != layers:
        raise MatvlmError(f"{file}: attn_layers leave Mamba layers {layers}, but the weights hold Mamba layers {in_weights}")
    for layer in layers:
        for name, expected in (("in_proj.weight", 2 * mixer.d_inner + 2 * d_xb + mixer.nheads),
                               ("conv1d.weight", mixer.d_inner + 2 * d_xb)):
            key = f"language_model.model.layers.{layer}.mamba.{name}"
            if key in shapes and shapes[key][0] != expected:
                raise MatvlmError(f"{file}: d_inner {mixer.d_inner} and d_xb {d_xb} disagree with the weights "
                                  f"({key} has {shapes[key][0]} rows, expected {expected})")
    setattr(config, HYBRID_KEY, hybrid_block(layers, mixer, source=str(path), released_by="MaTVLM"))
    return config


def _widen_per_head(rows: torch.Tensor, head_width: int, repeat: int) -> torch.Tensor:
    """KV-width rows to query width, each KV head's block repeated for the heads that share it (exact:
    MaTVLM repeats x and B the same way after its depthwise conv)."""
    return rows.unflatten(0, (-1, head_width)).repeat_interleave(repeat, dim=0).flatten(0, 1)


def _mixer_tensor(name: str, tensor: torch.Tensor, mixer: Mamba2Config, d_xb: int, file: Path) -> torch.Tensor:
    d_inner, nheads = mixer.d_inner, mixer.nheads
    repeat = d_inner // d_xb
    if name in ("in_proj.weight", "in_proj.bias"):
        expected = 2 * d_inner + 2 * d_xb + nheads
        if tensor.shape[0] != expected:
            raise MatvlmError(f"{file}: d_xb {d_xb} disagrees with the weights (in_proj has {tensor.shape[0]} rows, "
                              f"expected {expected})")
        z, x, B, C, dt = tensor.split([d_inner, d_xb, d_xb, d_inner, nheads])
        return torch.cat([z, _widen_per_head(x, mixer.headdim, repeat), _widen_per_head(B, mixer.d_state, repeat), C, dt])
    if name in ("conv1d.weight", "conv1d.bias"):
        expected = d_inner + 2 * d_xb
        if tensor.shape[0] != expected:
            raise MatvlmError(f"{file}: d_xb {d_xb} disagrees with the weights (conv1d has {tensor.shape[0]} channels, "
                              f"expected {expected})")
        x, B, C = tensor.split([d_xb, d_xb, d_inner])
        return torch.cat([_widen_per_head(x, mixer.headdim, repeat), _widen_per_head(B, mixer.d_state, repeat), C])
    return tensor


# ------------------------------------------------------------------------------------------- weights

def _target_name(key: str, targets: set[str], attention_name: str | None) -> str | None:
    """The LLaVA name of a TinyLLaVA weight, among the names the model has."""
    candidates = []
    if key.startswith("language_model.model."):
        rest = key[len("language_model.model."):]
        if attention_name is not None:
            rest = rest.replace(".mamba.", f".{attention_name}.", 1)
        candidates = [f"model.language_model.{rest}"]
    elif key.startswith("language_model.lm_head."):
        candidates = [key[len("language_model."):]]
    elif key.startswith("vision_tower._vision_tower."):
        rest = key[len("vision_tower._vision_tower."):]
        # transformers 5.2x's SiglipVisionModel has no `vision_model.` level; older ones do.
        candidates = [f"model.vision_tower.{rest}"]
        if rest.startswith("vision_model."):
            candidates.append(f"model.vision_tower.{rest[len('vision_model.'):]}")
    elif key.startswith("connector._connector."):
        index, _, param = key[len("connector._connector."):].partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        candidates = [f"model.multi_modal_projector.{linear}.{param}"] if linear else []
    return next((c for c in candidates if c in targets), None)


def tinyllava_state_dict(path: Path, files: list[Path], config, targets: set[str], attention_name: str | None) -> dict:
    """The folder's weights under the LLaVA model's names (mixers in this project's layout); a weight with
    no place in the model is an error naming it."""
    block = getattr(config, HYBRID_KEY, None)
    mixer, d_xb = None, None
    if block and (Path(path) / MAMBA_CONFIG_FILE).is_file():
        _, mixer, d_xb = matvlm_release_mixer(path, config.text_config)
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                target = _target_name(key, targets, attention_name)
                if target is None:
                    raise MatvlmError(f"{file}: weight {key} has no place in the model read from config.json")
                tensor = handle.get_tensor(key)
                if ".mamba." in key:
                    tensor = _mixer_tensor(key.rsplit(".mamba.", 1)[1], tensor, mixer, d_xb, Path(path) / MAMBA_CONFIG_FILE)
                state[target] = tensor
    return state
