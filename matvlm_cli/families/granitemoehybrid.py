"""GraniteMoeHybrid: what `matvlm export` writes. Already a hybrid; read (evaluate, bench, generate),
never converted again."""

from . import TextFamily

TEXT = (TextFamily(model_types=("granitemoehybrid",), export="already a stock hybrid"),)
