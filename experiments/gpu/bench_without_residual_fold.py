"""`matvlm bench` with the compiled decode step's residual fold (matvlm_cli/bench/residual_fold.py) switched off:
the "before" half of an A/B in one call, whatever card the call gets (the fold stage of experiments/gpu/h200_bench.sh).

    python experiments/gpu/bench_without_residual_fold.py --ratio 0.5 --seq-len 8192 --engine graphs

Takes `matvlm bench`'s options. Only the pass is replaced: everything else is the command a user runs.
"""

import sys

from matvlm_cli import cli
from matvlm_cli.bench import residual_fold


class NoResidualFold(residual_fold.ResidualFold):
    """Folds nothing. Its own cache key, so inductor's on-disk cache cannot hand back a step compiled with the
    fold (the real pass's key is its source files, which this run shares)."""

    def __call__(self, graph) -> None:
        self.folded.append(0)

    def uuid(self) -> bytes:
        return b"matvlm-no-residual-fold"


residual_fold.ResidualFold = NoResidualFold  # engines.GraphEngine.compile_step imports it when it compiles
sys.argv = ["matvlm", "bench", *sys.argv[1:]]
cli.main()
