"""What the rest of the project needs to know about a stock transformers hybrid (GraniteMoeHybrid,
as `matvlm export` writes it) when it loads one as it would a teacher: where its Mamba layers are, and
whether the installed transformers computes them the way the hybrid was trained."""

from __future__ import annotations

import inspect

from ..errors import MatvlmError

# GraniteMoeHybrid's decoder layer holds its Mamba-2 mixer here, and sets `self_attn` to None.
STOCK_MAMBA_ATTRIBUTE = "mamba"
STOCK_HYBRID_TYPES = ("granitemoehybrid",)
PER_GROUP_NORM_SINCE = "5.23"


def per_group_gated_norm_available() -> bool:
    """Whether the installed GraniteMoeHybrid normalises its gated norm per group of d_inner / n_groups.
    transformers 5.17-5.22 normalise over all of d_inner, which equals this project's norm only for
    one group."""
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid

    return "group_size" in inspect.signature(modeling_granitemoehybrid.GraniteMoeHybridRMSNormGated.__init__).parameters


def per_group_norm_problem(groups: int) -> str | None:
    """Why the installed transformers would compute a gated norm of `groups` groups wrongly, or None."""
    if groups == 1 or per_group_gated_norm_available():
        return None
    import transformers

    return (
        f"transformers {transformers.__version__}'s GraniteMoeHybrid normalises the Mamba gated norm over all of "
        f"d_inner, but this model's norm is per group ({groups} groups); that needs transformers >= {PER_GROUP_NORM_SINCE}"
    )


def is_stock_hybrid(config) -> bool:
    """A stock transformers hybrid with at least one Mamba layer (what `matvlm export` writes)."""
    text_config = config.get_text_config(decoder=True)
    kinds = getattr(text_config, "layer_types", None) or []
    return text_config.model_type in STOCK_HYBRID_TYPES and any(kind in ("mamba", "linear_attention") for kind in kinds)


def check_stock_hybrid(path, config) -> None:
    """Refuse a stock hybrid that this transformers would load without error but compute wrongly."""
    text_config = config.get_text_config(decoder=True)
    if text_config.model_type in STOCK_HYBRID_TYPES and (
        problem := per_group_norm_problem(getattr(text_config, "mamba_n_groups", 1) or 1)
    ):
        raise MatvlmError(f"{path}: {problem}")
