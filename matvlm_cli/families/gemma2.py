"""Gemma 2: alternating sliding-window and global layers (read from `layer_types` by the core), extra
norms after each sublayer (kept: they are the decoder layer's), and soft-capped attention logits."""

from . import TextFamily


def _not_carried(config) -> list[str]:
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap:
        return [f"attention-logit soft-capping (attn_logit_softcapping {cap:g}): a Mamba layer has no attention logits to cap"]
    return []


TEXT = (
    TextFamily(
        model_types=("gemma2",),
        not_carried=_not_carried,
        export="Gemma-2's logit soft-capping, extra norms and sliding-window layers",
    ),
)
