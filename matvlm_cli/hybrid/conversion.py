"""Turning a teacher into a hybrid: find its decoder layers, choose which to replace, and build
each Mamba-2 mixer from the attention weights it replaces (MaTVLM's mapping; docs/convert.md).

Works on any Hugging Face decoder whose attention module has q/k/v projections and an output
projection named `o_proj` (Llama, Mistral, Qwen2, ...) or `dense` (Phi), whether the decoder is a
plain causal LM or the language model inside a VLM.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..choices import Placement, choices
from ..errors import MatvlmError, MatvlmWarning
from ..families import GENERIC_TEXT, TextFamily, described_models, model_family, text_family
from .cache import PaddingMaskTap
from .mamba2 import Mamba2Mixer
from .mixer_config import Mamba2Config
from .stock import STOCK_MAMBA_ATTRIBUTE

HYBRID_KEY = "matvlm"  # the config block that marks a hybrid and records how it was made
PLACEMENTS = choices(Placement)
ATTENTION_NAMES = ("self_attn", "attention", "attn")
OUTPUT_PROJ_NAMES = ("o_proj", "dense")
SUPPORTED_LAYOUT = (
    "decoder layers with an attention module (self_attn) holding q_proj, k_proj, v_proj and "
    "o_proj or dense, as in Llama, Mistral, Qwen2 and Phi"
)


@dataclass
class DecoderLayout:
    """Where the replaceable attention modules of a model live."""

    model: nn.Module  # the whole model: its forward receives the 2-D padding mask
    text_model: nn.Module  # the module that owns `layers`
    layers: nn.ModuleList
    attention_name: str
    family: TextFamily

    def attention(self, idx: int) -> nn.Module:
        return getattr(self.layers[idx], self.attention_name)


def _is_stock_mamba_layer(layer: nn.Module) -> bool:
    return getattr(layer, STOCK_MAMBA_ATTRIBUTE, None) is not None


def _attention_name(layer: nn.Module) -> str | None:
    for name in ATTENTION_NAMES:
        attn = getattr(layer, name, None)
        if isinstance(attn, Mamba2Mixer) or (attn is None and hasattr(layer, name) and _is_stock_mamba_layer(layer)):
            return name
        if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")) and any(
            hasattr(attn, p) for p in OUTPUT_PROJ_NAMES
        ):
            return name
    return None


def _text_model(model: nn.Module) -> nn.Module:
    """The module owning the decoder layers: the path its family description names, or for a text-only
    model (or an undescribed one, with a warning) `get_decoder()`. The whole model is never searched: a
    vision tower's layers have q/k/v/o projections too."""
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    described = model_family(model.config)
    if described is not None:
        try:
            return model.get_submodule(described.decoder)
        except AttributeError:
            raise MatvlmError(f"{arch}: no decoder at {described.decoder!r}, where its family description puts it") from None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = None
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:
            decoder = None
    if decoder is None or decoder is model and getattr(model.config, "vision_config", None) is not None:
        raise MatvlmError(
            f"{arch}: cannot tell its text decoder from its vision tower (no get_decoder() and no family "
            f"description; described: {described_models()})"
        )
    if getattr(model.config, "vision_config", None) is not None:
        warnings.warn(f"{arch}: no family description; converting the layers of get_decoder() ({type(decoder).__name__})",
                      MatvlmWarning, stacklevel=3)
    return decoder


def find_decoder(model: nn.Module) -> DecoderLayout:
    """Locate the text decoder's layer list; vision towers are never touched."""
    text_model = _text_model(model)
    layers = getattr(text_model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        names = {_attention_name(layer) for layer in layers}
        if len(names) == 1 and None not in names:
            family = text_family(model.config.get_text_config(decoder=True))
            return DecoderLayout(model, text_model, layers, names.pop(), family)
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    raise MatvlmError(f"unsupported architecture {arch}: expected {SUPPORTED_LAYOUT}")


def attention_windows(text_config) -> list[int | None]:
    """Each decoder layer's attention window in tokens, None for full attention. Read from `layer_types`
    (Gemma 2 and 3, Qwen2's max_window_layers) or from a model-wide `sliding_window` (Mistral v0.1).
    A window at least as long as max_position_embeddings never hides a token the model was made for,
    so it is none (Mistral configs often carry 4096 beside shorter positions)."""
    num_layers = text_config.num_hidden_layers
    window = getattr(text_config, "sliding_window", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if window is not None and positions is not None and window >= positions:
        window = None
    kinds = getattr(text_config, "layer_types", None)
    if kinds is None:
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in kinds]


def _spread(candidates: list[int], k: int) -> list[int]:
    return [candidates[i * len(candidates) // k] for i in range(k)]


def layer_count(num_layers: int, ratio: float | None = None, count: int | None = None) -> int:
    """How many layers to replace: `count`, or k = round(ratio * N)."""
    if count is not None:
        if count < 1:
            raise MatvlmError(f"count: must be at least 1, got {count}")
        if count > num_layers:
            raise MatvlmError(f"count: {count} layers is more than the decoder has ({num_layers})")
        return count
    if ratio is None:
        raise MatvlmError("give either a ratio or a list of layers")
    if not 0 < ratio <= 1:
        raise MatvlmError(f"ratio: {ratio} is outside (0, 1]")
    k = round(ratio * num_layers)
    if k < 1:
        raise MatvlmError(f"ratio: {ratio} of {num_layers} layers rounds to 0 layers; use at least {1 / num_layers:.3g}")
    return k


def choose_layers(
    num_layers: int, ratio: float | None = None, placement: str = "even", layers: list[int] | None = None,
    windows: list[int | None] | None = None, count: int | None = None,
) -> list[int]:
    """Indices of the layers to replace: explicit `layers`, or k (`count`, or round(ratio * N)) placed by
    `placement`.

    With `windows` (see `attention_windows`) that mix sliding-window and global layers, `even` spreads
    the k layers over the global layers first, then over the window layers: a converted global layer
    frees the whole context's KV cache, a window layer at most its window."""
    if layers is not None:
        if len(layers) == 0:
            raise MatvlmError("layers: the list is empty")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise MatvlmError(f"layers: {bad} out of range for a decoder of {num_layers} layers (0..{num_layers - 1})")
        dupes = sorted({i for i in layers if layers.count(i) > 1})
        if dupes:
            raise MatvlmError(f"layers: duplicate indices {dupes}")
        return sorted(layers)
    k = layer_count(num_layers, ratio, count)
    if placement == "even":
        globals_ = [i for i, window in enumerate(windows or []) if window is None]
        if windows is None or not globals_ or len(globals_) == num_layers:
            return _spread(list(range(num_layers)), k)
        if k <= len(globals_):
            return _spread(globals_, k)
        windowed = [i for i in range(num_layers) if i not in globals_]
        return sorted(globals_ + _spread(windowed, k - len(globals_)))
    if placement == "front":
        return list(range(k))
    if placement == "back":
        return list(range(num_layers - k, num_layers))
    if placement == "middle":
        start = (num_layers - k) // 2
        return list(range(start, start + k))
    raise MatvlmError(f"placement: {placement!r} is not one of {', '.join(PLACEMENTS)}")


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


def attention_geometry(attn: nn.Module, text_config) -> AttentionGeometry:
    hidden = attn.q_proj.in_features
    head_dim = getattr(attn, "head_dim", None) or getattr(text_config, "head_dim", None)
    if not head_dim:
        head_dim = hidden // text_config.num_attention_heads
    q_out, kv_out = attn.q_proj.out_features, attn.k_proj.out_features
    if q_out % head_dim or kv_out % head_dim or (q_out // head_dim) % (kv_out // head_dim):
        raise MatvlmError(f"unsupported attention shapes: q {q_out}, k {kv_out}, head_dim {head_dim}")
    return AttentionGeometry(q_out // head_dim, kv_out // head_dim, head_dim, hidden)


def mixer_config_for(
    geometry: AttentionGeometry, keep_bias: bool = False, chunk_size: int = 128, bc_norm_eps: float | None = None
) -> Mamba2Config:
    """nheads = attention heads, headdim = d_state = head_dim, ngroups = nheads (MaTVLM's mapping)."""
    return Mamba2Config(
        d_model=geometry.hidden_size,
        nheads=geometry.num_heads,
        headdim=geometry.head_dim,
        d_state=geometry.head_dim,
        ngroups=geometry.num_heads,
        bias=keep_bias,
        chunk_size=chunk_size,
        bc_norm_eps=bc_norm_eps,
    )


def _output_projection_name(attn: nn.Module, family: TextFamily) -> str:
    for name in (family.output_projection, *OUTPUT_PROJ_NAMES):
        if hasattr(attn, name):
            return name
    raise MatvlmError(f"unsupported attention module {type(attn).__name__}: no o_proj or dense")


def _output_projection(attn: nn.Module, family: TextFamily) -> nn.Linear:
    return getattr(attn, _output_projection_name(attn, family))


def qk_norm_eps(attn: nn.Module, family: TextFamily) -> float | None:
    """The epsilon of the family's per-head q/k norms in this attention module, or None without them."""
    if family.qk_norms is None or not all(hasattr(attn, name) for name in family.qk_norms):
        return None
    norm = getattr(attn, family.qk_norms[0])
    return float(next(getattr(norm, name) for name in ("variance_epsilon", "eps", "epsilon") if hasattr(norm, name)))


def uncarried_parameters(attn: nn.Module, family: TextFamily, keep_bias: bool = False, qk_norms: bool = True) -> list[str]:
    """The attention's learned parameters that `mixer_from_attention` does not carry into the mixer, e.g.
    the q/k/v/o biases without `keep_bias`, or q/k norms no family description maps; convert's report
    names them, so nothing is dropped silently."""
    projections = {"q_proj", "k_proj", "v_proj", _output_projection_name(attn, family)}
    carried = {f"{name}.weight" for name in projections} | ({f"{name}.bias" for name in projections} if keep_bias else set())
    if qk_norms and qk_norm_eps(attn, family) is not None:
        carried |= {f"{name}.weight" for name in family.qk_norms}
    return [name for name, _ in attn.named_parameters() if name not in carried]


def not_carried(layout: DecoderLayout, layers: list[int], keep_bias: bool = False, qk_norms: bool = True) -> list[str]:
    """One line per part of the teacher that converting `layers` drops: learned attention parameters with
    no place in the mixer, and what the family's attention (or its VLM wrapper) does that a causal Mamba
    layer does not. Convert's report prints them, so nothing is dropped silently."""
    config = layout.model.config
    params = uncarried_parameters(layout.attention(layers[0]), layout.family, keep_bias, qk_norms)
    biases = [name for name in params if name.endswith(".bias")]
    others = [name for name in params if name not in biases]
    lines = []
    if biases:
        lines.append(f"{', '.join(biases)} (MaTVLM drops attention biases; --keep-bias carries them)")
    if others:
        lines.append(f"{', '.join(others)} (learned parts of the teacher's attention with no place in the Mamba-2 mixer)")
    lines += layout.family.not_carried(config.get_text_config(decoder=True))
    if (wrapper := model_family(config)) is not None:
        lines += wrapper.not_carried(config)
    return lines


@torch.no_grad()
def mixer_from_attention(
    attn: nn.Module, geometry: AttentionGeometry, config: Mamba2Config, layer_idx: int, seed: int = 0,
    family: TextFamily = GENERIC_TEXT,
) -> Mamba2Mixer:
    """A Mamba-2 mixer initialised from one attention module: x <- V, B <- K, C <- Q, out <- O.

    A teacher that RMS-normalises queries and keys per head (q_norm, k_norm) gets the same norms on C
    and B, after the convolution, with the same gains (`bc_norm_eps` set): C and B then reach the scan
    at the scale q and k reached the attention scores.

    GQA keys and values are repeated so every head has its own copy. The z and dt rows, dt_bias,
    A_log, D, the conv and the norm get the standard Mamba-2 initialisation, from a generator
    seeded by (seed, layer_idx) so a conversion is reproducible.
    """
    weight = attn.q_proj.weight
    if weight.is_meta:  # a model built on the meta device converts to the hybrid's structure, with no values
        return Mamba2Mixer(config, layer_idx, device="meta", dtype=weight.dtype)
    generator = torch.Generator().manual_seed(seed * 100_003 + layer_idx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        mixer = Mamba2Mixer(config, layer_idx, dtype=torch.float32)
        mixer.reset_ssm_parameters(generator)

    repeat = geometry.num_heads // geometry.num_kv_heads

    def per_head(t: torch.Tensor) -> torch.Tensor:
        """Repeat each KV head's rows (or bias entries) for the query heads that share it."""
        heads = t.unflatten(0, (geometry.num_kv_heads, geometry.head_dim))
        return heads.repeat_interleave(repeat, dim=0).flatten(0, 1)

    d_inner, bc = config.d_inner, config.ngroups * config.d_state
    x_rows = slice(d_inner, 2 * d_inner)
    b_rows = slice(2 * d_inner, 2 * d_inner + bc)
    c_rows = slice(2 * d_inner + bc, 2 * d_inner + 2 * bc)
    mixer.in_proj.weight[x_rows] = per_head(attn.v_proj.weight.float())
    mixer.in_proj.weight[b_rows] = per_head(attn.k_proj.weight.float())
    mixer.in_proj.weight[c_rows] = attn.q_proj.weight.float()
    out_proj = _output_projection(attn, family)
    mixer.out_proj.weight.copy_(out_proj.weight.float())
    if config.bc_norm_eps is not None:
        q_norm, k_norm = (getattr(attn, name) for name in family.qk_norms)
        mixer.C_norm.weight.copy_(family.norm_gain(q_norm).float().repeat(config.ngroups))
        mixer.B_norm.weight.copy_(family.norm_gain(k_norm).float().repeat(config.ngroups))
    if config.bias:
        mixer.in_proj.bias.zero_()
        for rows, proj, repeat_rows in ((x_rows, attn.v_proj, True), (b_rows, attn.k_proj, True), (c_rows, attn.q_proj, False)):
            if proj.bias is not None:
                mixer.in_proj.bias[rows] = per_head(proj.bias.float()) if repeat_rows else proj.bias.float()
        mixer.out_proj.bias.copy_(out_proj.bias.float() if out_proj.bias is not None else 0.0)
    return mixer.to(device=weight.device, dtype=weight.dtype)


def install_mixers(model: nn.Module, mixers: dict[int, Mamba2Mixer], layout: DecoderLayout | None = None) -> DecoderLayout:
    """Put mixers in place of the attention modules at their indices and wire the padding mask."""
    layout = layout or find_decoder(model)
    tap = PaddingMaskTap()
    for idx, mixer in mixers.items():
        mixer.padding_mask_tap = tap
        setattr(layout.layers[idx], layout.attention_name, mixer)
    tap.attach(layout.model, layout.text_model)
    return layout


def hybrid_layers(model: nn.Module) -> list[int]:
    """The Mamba layers: this project's mixers, or a stock hybrid's (an exported model)."""
    layout = find_decoder(model)
    return [
        i for i, layer in enumerate(layout.layers)
        if isinstance(getattr(layer, layout.attention_name), Mamba2Mixer) or _is_stock_mamba_layer(layer)
    ]


def hybrid_block(layers: list[int], mixer: Mamba2Config, **provenance) -> dict:
    return {"version": 1, "layers": list(layers), "mixer": mixer.to_dict(), **provenance}


def convert_to_hybrid(
    model: nn.Module,
    layers: list[int],
    keep_bias: bool = False,
    seed: int = 0,
    chunk_size: int = 128,
    qk_norms: bool = True,
    **provenance,
) -> Mamba2Config:
    """Replace the attention of `layers` in `model` (in place) and record the conversion in
    `model.config.matvlm` (with `provenance`, e.g. source=...). Returns the mixer config used.
    `qk_norms=False` drops a teacher's q/k norms instead of carrying them (for measuring what they give)."""
    if getattr(model.config, HYBRID_KEY, None) or hybrid_layers(model):
        raise MatvlmError("this model is already a hybrid; convert the original teacher instead")
    layout = find_decoder(model)
    text_config = model.config.get_text_config(decoder=True)
    geometry = attention_geometry(layout.attention(layers[0]), text_config)
    eps = qk_norm_eps(layout.attention(layers[0]), layout.family) if qk_norms else None
    config = mixer_config_for(geometry, keep_bias=keep_bias, chunk_size=chunk_size, bc_norm_eps=eps)
    mixers = {
        idx: mixer_from_attention(layout.attention(idx), geometry, config, idx, seed, layout.family) for idx in layers
    }
    install_mixers(model, mixers, layout)
    setattr(model.config, HYBRID_KEY, hybrid_block(layers, config, keep_bias=keep_bias, seed=seed, **provenance))
    return config


def build_empty_mixers(model: nn.Module, layers: list[int], config: Mamba2Config) -> DecoderLayout:
    """The hybrid's structure with uninitialised mixers, ready for `load_state_dict` (loading)."""
    device = next(model.parameters()).device
    mixers = {idx: Mamba2Mixer(config, idx, device=device) for idx in layers}
    return install_mixers(model, mixers)
