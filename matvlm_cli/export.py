"""The `export` subcommand's engine: rewrite a hybrid as a stock transformers model.

The hybrid's language model becomes a GraniteMoeHybrid text model (attention layers stay attention,
converted layers become its Mamba-2 layers, dense gated-SiLU MLPs become its `shared_mlp` with no
experts); a VLM keeps its own outer class (e.g. LlavaForConditionalGeneration) with that text model
inside. The directory then loads with `AutoModelForImageTextToText` / `AutoModelForCausalLM` from
transformers alone, and vLLM serves GraniteMoeHybrid (docs/serving.md).

GraniteMoeHybrid is Llama with Granite's multipliers, so they are set to make it Llama again:
attention scale 1/sqrt(head_dim), logits divided by 1. It has one RMSNorm epsilon for the decoder
norms and the Mamba gated norm, where a hybrid has the teacher's for the first and the mixer's for
the second. RMSNorm(s·x, eps) = RMSNorm(x, eps / s²), so the export uses the mixer's epsilon
throughout and runs the residual stream s = sqrt(mixer_eps / teacher_eps) times larger
(`embedding_multiplier` = `residual_multiplier` = s): every decoder norm then sees the teacher's
epsilon, and the final norm removes s before the head. Exact in real arithmetic; fp32 rounding only.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from rich.console import Console
from transformers import GraniteMoeHybridConfig

from .atomic import atomic_directory, check_output_dir
from .errors import MatvlmError
from .families import GENERIC_TEXT, TEXT_FAMILIES, ExportMapping
from .hybrid.conversion import HYBRID_KEY, attention_windows, find_decoder
from .hybrid.layouts import load_config, model_class_for
from .hybrid.load import load_hybrid
from .hybrid.mixer_config import Mamba2Config
from .hybrid.processors import PROCESSOR_FILES
from .hybrid.stock import PER_GROUP_NORM_SINCE, per_group_norm_problem
from .hybrid.tinyllava import HEAD_BIAS_KEY

TARGET = "GraniteMoeHybrid"

TARGET_MLP = {"gate_up": "shared_mlp.input_linear.weight", "down": "shared_mlp.output_linear.weight"}
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# How each text family maps onto GraniteMoeHybrid is in its family description (matvlm_cli/families).
EXPORTABLE = ", ".join(name for name, family in TEXT_FAMILIES.items() if isinstance(family.export, ExportMapping))


def _refuse(path: Path, reason: str) -> MatvlmError:
    return MatvlmError(f"{path}: cannot export to a stock {TARGET} model: {reason}")


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def _rotary_fraction(text_config) -> float:
    rope = getattr(text_config, "rope_parameters", None) or {}
    return float(rope.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", None) or 1.0))


def biased_projections(mapping: ExportMapping, text_config) -> tuple[str, ...]:
    if mapping.bias_flag and getattr(text_config, mapping.bias_flag, False):
        return ATTENTION_PROJECTIONS
    return mapping.biased


def check_exportable(path: Path, config) -> tuple[ExportMapping, Mamba2Config]:
    """Everything the config alone can rule out, before any weight is read."""
    block = getattr(config, HYBRID_KEY, None)
    if not block:
        raise MatvlmError(
            f"{path}: not a matvlm hybrid (config.json has no '{HYBRID_KEY}' block); export takes what convert or distill wrote"
        )
    text = config.get_text_config(decoder=True)
    if getattr(config, HEAD_BIAS_KEY, False):
        raise _refuse(path, f"its output head has a bias ({HEAD_BIAS_KEY} in config.json), which {TARGET}'s head has not")
    mapping = TEXT_FAMILIES.get(text.model_type, GENERIC_TEXT).export
    if not isinstance(mapping, ExportMapping):
        raise _refuse(path, f"text model {text.model_type!r}: {mapping} (exportable: {EXPORTABLE})")
    for key, (wanted, feature) in mapping.requires.items():
        if getattr(text, key, wanted) != wanted:
            raise _refuse(path, f"{feature}: {key} is {getattr(text, key)!r}, {TARGET} has no such thing")
    # A window as long as the model's positions never applies (attention_windows reads it as none).
    windows = [window for window in attention_windows(text) if window is not None]
    if windows:
        raise _refuse(path, f"sliding-window attention ({max(windows)} tokens, under max_position_embeddings "
                            f"{text.max_position_embeddings}): {TARGET}'s attention is full causal attention only")
    layer_types = getattr(text, "layer_types", None) or []
    if any(kind not in ("full_attention", "sliding_attention") for kind in layer_types):
        raise _refuse(path, f"layer types {sorted(set(layer_types))}: {TARGET}'s attention is full causal attention only")
    if text.hidden_act != "silu":
        raise _refuse(path, f"hidden_act {text.hidden_act!r}: {TARGET} uses hidden_act for its Mamba convolution too, which this mixer runs with SiLU")
    head_dim, heads = _head_dim(text), text.num_attention_heads
    if head_dim * heads != text.hidden_size:
        raise _refuse(path, f"head_dim {head_dim} x {heads} heads != hidden {text.hidden_size}: {TARGET} (and vLLM's) fix head_dim = hidden / heads")
    if _rotary_fraction(text) != 1.0:
        raise _refuse(path, f"partial rotary embedding ({_rotary_fraction(text)} of head_dim): {TARGET} rotates the whole head")

    mixer = Mamba2Config.from_dict(block["mixer"])
    if mixer.d_model != text.hidden_size:
        raise _refuse(path, f"mixer d_model {mixer.d_model} != hidden {text.hidden_size}")
    if mixer.d_inner % mixer.d_model:
        raise _refuse(
            path, f"mamba_expand {mixer.d_inner}/{mixer.d_model} is not an integer (nheads {mixer.nheads} x headdim {mixer.headdim}); {TARGET} and vLLM size d_inner as mamba_expand x hidden"
        )
    if mixer.bias:
        raise _refuse(
            path, f"the mixer's in_proj bias (converted with --keep-bias): {TARGET} zeroes padded positions before "
            "in_proj, so that bias would reach the convolution from left padding and batched outputs would differ"
        )
    if mixer.dt_bounds != (0.0, math.inf):
        raise _refuse(path, f"dt_limit {list(mixer.dt_limit)}: {TARGET}'s one-token decode step does not clamp dt")
    if problem := per_group_norm_problem(mixer.ngroups):
        raise _refuse(path, problem)
    return mapping, mixer


def residual_scale(text_config, mixer: Mamba2Config) -> float:
    """s with RMSNorm(s·x, mixer_eps) = RMSNorm(x, teacher_eps): see the module docstring."""
    return math.sqrt(mixer.norm_eps / text_config.rms_norm_eps)


def target_text_config(text, mixer: Mamba2Config, layers: list[int], attention_bias: bool) -> dict:
    scale = residual_scale(text, mixer)
    kinds = ["linear_attention" if i in layers else "full_attention" for i in range(text.num_hidden_layers)]
    return dict(
        architectures=[f"{TARGET}ForCausalLM"],
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        hidden_act=text.hidden_act, max_position_embeddings=text.max_position_embeddings,
        initializer_range=text.initializer_range, use_cache=True,
        pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
        # dense: no experts, the teacher's MLP as the shared one
        num_local_experts=0, intermediate_size=text.intermediate_size, shared_intermediate_size=text.intermediate_size,
        position_embedding_type="rope", rope_parameters=dict(text.rope_parameters),
        attention_bias=attention_bias, attention_dropout=text.attention_dropout,
        attention_multiplier=_head_dim(text) ** -0.5, logits_scaling=1.0,
        rms_norm_eps=mixer.norm_eps, embedding_multiplier=scale, residual_multiplier=scale,
        layer_types=kinds,
        mamba_n_heads=mixer.nheads, mamba_n_groups=mixer.ngroups, mamba_d_state=mixer.d_state, mamba_d_head=mixer.headdim,
        mamba_d_conv=mixer.d_conv, mamba_expand=mixer.d_inner // mixer.d_model, mamba_chunk_size=mixer.chunk_size,
        mamba_conv_bias=mixer.conv_bias, mamba_proj_bias=mixer.bias,
    )


def target_config(config, text_dict: dict):
    """The source's config with a GraniteMoeHybrid text config and no matvlm block."""
    text_config = GraniteMoeHybridConfig(**text_dict)
    if config.get_text_config(decoder=True) is config:  # a text-only causal LM
        text_config.dtype = config.dtype
        return text_config
    outer = config.to_dict()
    outer.pop(HYBRID_KEY, None)
    outer["text_config"] = text_config.to_dict()
    return type(config).from_dict(outer)


def _module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def map_state_dict(
    path: Path, state: dict[str, torch.Tensor], text_prefix: str, layers: list[int], mapping: ExportMapping,
    biased: tuple[str, ...], num_layers: int,
) -> dict[str, torch.Tensor]:
    """The source weights under GraniteMoeHybrid's names. Outside the text model's layers nothing is renamed."""
    mapped, mlp_parts = {}, {}
    role_of = {name: role for role, name in mapping.mlp.items()}
    layers_prefix = f"{text_prefix}.layers."
    for key, tensor in state.items():
        if not key.startswith(layers_prefix):  # vision tower, connector, embeddings, final norm, head
            mapped[key] = tensor
            continue
        index, inner = key[len(layers_prefix):].split(".", 1)
        index = int(index)
        if inner in role_of:
            mlp_parts.setdefault(index, {})[role_of[inner]] = tensor
        elif index in layers and inner.startswith("self_attn."):
            mapped[f"{layers_prefix}{index}.mamba.{inner.removeprefix('self_attn.')}"] = tensor
        else:
            mapped[key] = tensor
    for index in range(num_layers):
        prefix = f"{text_prefix}.layers.{index}."
        parts = mlp_parts.get(index, {})
        if set(parts) != {"gate", "up", "down"}:
            raise _refuse(path, f"layer {index}: expected a gated MLP ({', '.join(mapping.mlp.values())}), found {sorted(parts) or 'none'}")
        mapped[prefix + TARGET_MLP["gate_up"]] = torch.cat([parts["gate"], parts["up"]])
        mapped[prefix + TARGET_MLP["down"]] = parts["down"]
        if index in layers or not biased:
            continue
        for projection in ATTENTION_PROJECTIONS:
            weight = mapped[f"{prefix}self_attn.{projection}.weight"]
            mapped.setdefault(f"{prefix}self_attn.{projection}.bias", weight.new_zeros(weight.shape[0]))
    return mapped


def build_export(path: Path):
    """The stock model, holding the hybrid's own weight tensors (only the MLP's gate and up are copied, into one)."""
    config = load_config(path)
    mapping, mixer = check_exportable(path, config)
    text = config.get_text_config(decoder=True)
    layers = list(getattr(config, HYBRID_KEY)["layers"])
    source = load_hybrid(path)
    layout = find_decoder(source)
    text_prefix = _module_path(source, layout.text_model)
    for index in range(text.num_hidden_layers):
        if index in layers:
            continue
        attention = layout.attention(index)
        present = tuple(p for p in ATTENTION_PROJECTIONS if getattr(getattr(attention, p, None), "bias", None) is not None)
        if set(present) - set(biased_projections(mapping, text)):
            raise _refuse(path, f"layer {index}: attention biases on {present}, which a {text.model_type} decoder does not have")
    biased = biased_projections(mapping, text)
    state = map_state_dict(path, source.state_dict(), text_prefix, layers, mapping, biased, text.num_hidden_layers)
    new_config = target_config(config, target_text_config(text, mixer, layers, attention_bias=bool(biased)))
    auto_class = model_class_for(new_config)
    with torch.device("meta"):  # no second copy of the weights: the source tensors are assigned below
        target = auto_class.from_config(new_config, dtype=next(source.parameters()).dtype)
    expected = set(target.state_dict())
    unplaced = sorted(set(state) - expected)
    if unplaced:
        raise _refuse(path, f"weights with no place in {TARGET}: {', '.join(unplaced[:3])}{' ...' if len(unplaced) > 3 else ''}")
    missing = sorted(expected - set(state))
    if missing:
        raise _refuse(path, f"{TARGET} weights the hybrid cannot fill: {', '.join(missing[:3])}")
    target.load_state_dict(state, strict=True, assign=True)
    target.tie_weights()
    target.generation_config = source.generation_config
    return target


LEGACY_LAYER_NAMES = {"linear_attention": "mamba", "full_attention": "attention"}


def _write_portable_config(directory: Path) -> None:
    """Write layer_types as IBM's Granite 4 checkpoints spell them ("mamba", "attention"): every
    transformers 5.x maps those to its current names, and vLLM's GraniteMoeHybrid keys its layers on them."""
    config_file = directory / "config.json"
    data = json.loads(config_file.read_text())
    text = data.get("text_config", data)
    text["layer_types"] = [LEGACY_LAYER_NAMES.get(kind, kind) for kind in text["layer_types"]]
    # (0, inf), the default, has no portable JSON spelling (5.24 writes {"__float__": "Infinity"})
    text.pop("time_step_limit", None)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_hybrid(hybrid: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    hybrid, output = Path(hybrid), Path(output)
    check_output_dir(output, "--output", overwrite=overwrite, inputs=(hybrid,))
    target = build_export(hybrid)
    with atomic_directory(output, overwrite) as tmp:
        target.save_pretrained(tmp, safe_serialization=True)
        _write_portable_config(tmp)
        for name in PROCESSOR_FILES:
            src = hybrid / name
            if src.is_file() and not (tmp / name).exists():
                shutil.copy2(src, tmp / name)
    return output


def run_export(hybrid: str | Path, output: str | Path, overwrite: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    with console.status(f"Exporting {hybrid}"):
        written = export_hybrid(hybrid, output, overwrite)
    config = json.loads((written / "config.json").read_text())
    text = config.get("text_config", config)
    mamba = [i for i, kind in enumerate(text["layer_types"]) if kind == "mamba"]
    outer = (config.get("architectures") or ["?"])[0]
    # with one group the gated norm is the same over the whole width, which older versions compute
    floor = PER_GROUP_NORM_SINCE if text["mamba_n_groups"] > 1 else "5.17"
    console.print(
        f"Exported {hybrid} -> [bold]{written}[/bold]: {outer} with a {TARGET} text model "
        f"(Mamba-2 layers {mamba} of {len(text['layer_types'])}); it loads with stock transformers >= {floor}"
    )
    return written
