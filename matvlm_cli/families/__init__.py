"""What matvlm knows about each model family, one description per family (in the spirit of
transformers' per-model folders), and the lookup from a config to its descriptions.

A model is described at two levels:
- its **text family** (`TextFamily`, keyed by the text config's `model_type`): how one decoder layer's
  attention maps onto a Mamba-2 mixer, what of it a causal, position-free mixer cannot carry, and
  whether and how it exports to a stock transformers hybrid;
- for a VLM, its **model family** (`ModelFamily`, keyed by the outer config's `model_type`): where the
  text decoder sits (so that the vision tower, which has q/k/v/o projections too, is never touched),
  what the wrapper does to attention that a converted layer will not do, and whether and how vLLM
  serves its export (`matvlm_cli.serve`).

What every family shares (q/k/v/o as x/B/C/out, GQA repetition, sliding-window layers read from
`layer_types`) lives in the core; a family file only says how it differs. Adding a family is adding
one file here and naming it in `_MODULES`.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import MatvlmWarning

# The per-family files, in the order their descriptions are registered.
_MODULES = (
    "llama", "mistral", "qwen2", "qwen3", "phi", "gemma", "gemma2", "gemma3", "olmo2",
    "granitemoehybrid", "llava", "idefics3", "internvl",
)


@dataclass(frozen=True)
class ExportMapping:
    """How a text family becomes GraniteMoeHybrid (`matvlm export`), exactly."""

    # Attention projections that always carry a bias; GraniteMoeHybrid's single `attention_bias`
    # then gives all four one, and the others are written as zeros.
    biased: tuple[str, ...] = ()
    # A config key that switches biases on for all four projections.
    bias_flag: str | None = None
    # Config values the mapping needs, with what the family would otherwise have that GraniteMoeHybrid lacks.
    requires: dict[str, tuple[object, str]] = field(default_factory=dict)
    # A Llama-style gated MLP's weights, by role.
    mlp: dict[str, str] = field(
        default_factory=lambda: {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
    )


def _weight(norm: nn.Module) -> torch.Tensor:
    return norm.weight


def needs_torchvision(what: str) -> str:
    """Why a family is not served yet, when vLLM's code for it needs torchvision (`what` says which part)."""
    return (f"{what}, which needs torchvision, and torchvision's Linux wheels cannot sit beside the CPU torch "
            "that vLLM's CPU build runs on, so no export of this family has been served and checked yet (docs/serving.md)")


def _nothing(config) -> list[str]:
    return []


@dataclass(frozen=True)
class ServeMapping:
    """How vLLM serves this family's export as a hybrid (`matvlm_cli.serve`): vLLM's own class for the
    family, extended with the Mamba state of the GraniteMoeHybrid text model inside, under the name
    `architecture`; and the weight names transformers 5 saves that vLLM's class reads under others."""

    vllm_class: str  # "module:Class" in vLLM
    # (regular expression over a saved weight name, replacement), applied before vLLM's own renaming
    renames: tuple[tuple[str, str], ...] = ()
    # "module:Name" when vLLM's class builds its language model from that fixed class (Idefics3's
    # LlamaModel) rather than from `text_config.architectures`: the plugin's class builds vLLM's
    # GraniteMoeHybridModel in its place.
    fixed_language_model: str | None = None

    @property
    def serves(self) -> str:
        """The transformers class whose exports it serves: vLLM names its classes after them."""
        return self.vllm_class.rpartition(":")[2]

    @property
    def architecture(self) -> str:
        return "Matvlm" + self.serves


@dataclass(frozen=True)
class TextFamily:
    """One decoder family's attention, as the conversion sees it."""

    model_types: tuple[str, ...]
    output_projection: str = "o_proj"
    # Per-head RMSNorms on queries and keys (Qwen3, Gemma 3, OLMo-2): (query norm, key norm) attribute
    # names. They become RMSNorms on C and B, with the same gains (see `hybrid.conversion`).
    qk_norms: tuple[str, str] | None = None
    # The norm's effective per-channel gain; Gemma's RMSNorms scale by (1 + weight).
    norm_gain: Callable[[nn.Module], torch.Tensor] = _weight
    # Features of this family's attention that a Mamba-2 mixer has no counterpart for, given the text
    # config: one line each, for convert's report.
    not_carried: Callable[[object], list[str]] = _nothing
    # How it exports, or why it cannot.
    export: ExportMapping | str = "no mapping to GraniteMoeHybrid for this text model"


@dataclass(frozen=True)
class ModelFamily:
    """One VLM wrapper: where its language model is, and what it does around attention."""

    model_types: tuple[str, ...]
    # Attribute path from the ...ForConditionalGeneration model to the text model that owns `layers`.
    decoder: str = "model.language_model"
    not_carried: Callable[[object], list[str]] = _nothing
    # The forward's keyword for a prefix LM's token types (PaliGemma: 0 = image and prompt, attended both
    # ways; 1 = the answer, causal). Distill sets it to 1 from the first answer token on, as PaliGemma's
    # processor does for a `suffix`: with 0 everywhere the teacher would read the answers it is predicting.
    prefix_lm_token_types: str | None = None
    # What `matvlm bench` needs to build a real image prompt (see `bench.models`):
    # - the family's image processor with defaults derived from the config, for a directory without a
    #   preprocessor_config.json (bench's config-only presets, tests' tiny models);
    image_processor: Callable[[object], object] | None = None
    # - the forward's keyword for "which tokens are image tokens" (1 there, 0 elsewhere), if it takes one
    #   (Qwen-VL's M-RoPE reads `mm_token_type_ids`, Gemma 3's bidirectional image mask `token_type_ids`);
    image_token_types: str | None = None
    # - for position ids that are not 0..n-1 (M-RoPE): (model, input_ids, model inputs) -> (the prompt's
    #   position ids, (batch, 1) offset that decoded tokens' positions have from their cache position).
    positions: Callable | None = None
    # - keywords the family's processor passes to its image processor (InternVL's tiling is switched on there).
    image_kwargs: dict = field(default_factory=dict)
    # How vLLM serves the family's export, or why it cannot.
    serve: ServeMapping | str = (
        "matvlm's vLLM plugin has no class for this family yet, and vLLM's own would allocate no Mamba state "
        "for the GraniteMoeHybrid text model inside"
    )


def square(vision_config) -> dict:
    """An image processor's `size` for a tower of square inputs."""
    side = vision_config.image_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    return {"height": side, "width": side}


def mrope_positions(model, input_ids: torch.Tensor, inputs: dict):
    """Qwen-VL's M-RoPE: the model's own 3-D position ids for the prompt and each row's text offset."""
    positions, deltas = model.model.get_rope_index(
        input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
    )
    return positions, deltas.reshape(input_ids.shape[0], 1)


TEXT_FAMILIES: dict[str, TextFamily] = {}
MODEL_FAMILIES: dict[str, ModelFamily] = {}


def _register() -> None:
    for name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for family in getattr(module, "TEXT", ()):
            TEXT_FAMILIES.update(dict.fromkeys(family.model_types, family))
        for family in getattr(module, "MODELS", ()):
            MODEL_FAMILIES.update(dict.fromkeys(family.model_types, family))


_register()
GENERIC_TEXT = TextFamily(model_types=())


def text_family(text_config) -> TextFamily:
    """The description of a text config's family; an unknown one is read as Llama-like, with a warning."""
    model_type = getattr(text_config, "model_type", None)
    family = TEXT_FAMILIES.get(model_type)
    if family is None:
        warnings.warn(
            f"no family description for text model {model_type!r}: its attention is mapped as Llama's "
            f"(q/k/v/o); described families: {', '.join(sorted(TEXT_FAMILIES))}",
            MatvlmWarning, stacklevel=2,
        )
        return GENERIC_TEXT
    return family


def model_family(config) -> ModelFamily | None:
    """The VLM wrapper's description, or None for a text-only model or a wrapper not described here."""
    return MODEL_FAMILIES.get(getattr(config, "model_type", None))


def described_models() -> str:
    return ", ".join(sorted(MODEL_FAMILIES))
