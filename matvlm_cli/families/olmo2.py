"""OLMo-2: q/k RMSNorms over all heads at once (not per head), and norms after each sublayer."""

from . import TextFamily


def _not_carried(config) -> list[str]:
    return ["q_norm/k_norm over the whole projection (OLMo-2 normalises all heads together): no per-group norm holds that"]


TEXT = (
    TextFamily(
        model_types=("olmo2",),
        not_carried=_not_carried,
        export="q/k norms and norms after the mixer and the MLP instead of before (OLMo-2)",
    ),
)
