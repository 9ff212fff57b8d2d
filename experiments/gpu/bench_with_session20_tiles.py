"""`matvlm bench` with the GEMV's tiles as they were before session 21 (every loop unpipelined; fc2 4 rows of
128 columns, 8 warps; dense 2 rows of 512): the "before" half of an A/B in one call, whatever card the call
gets, against the CLI itself.

    python experiments/gpu/bench_with_session20_tiles.py --seq-len 8192 --engine graphs

Takes `matvlm bench`'s options. Only `gemv.tiles` is replaced; the kernel reads it at each launch, outside the
compiled graph, so inductor's cache holds nothing that differs.
"""

import sys

from gemv_prefetch import session_20_tiles  # this folder: on the path when the script runs

from matvlm_cli import cli
from matvlm_cli.kernels import gemv

gemv.tiles = session_20_tiles  # gemv.launch looks it up when it launches
sys.argv = ["matvlm", "bench", *sys.argv[1:]]
cli.main()
