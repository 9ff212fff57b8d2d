"""Why the one-token GEMV reads Phi-2's weights slower since the merged products and the folded norm
(issue #26, session 18): per projection of the graphs engine's teacher step, the engine's launch (with and
without the folded norm and GELU) against cuBLAS and a sweep of tiles, on the GPU machine.

    python experiments/gpu/gemv_probe.py > docs/results/bench/gemv-probe-h200-stages.txt

Each time is the median replay of a CUDA graph over enough distinct weights (>= 400 MB) that none sits in
L2 from one call to the next; TB/s counts the weight bytes only. Every tile is launched by kernels/gemv.py's
own `launch`, PDL included where it is on.

The sweep (session 20): rows, columns and warps, each with the loop unpipelined (1 stage, the engine's) and
pipelined through shared memory (3 stages), then 2, 4 and 6 stages for the three best. Session 18's sweep
(gemv-probe-h200.txt) had a "stages" column too, but then it was a launch option, which Triton applies only to
loops with a tl.dot: all its tiles ran unpipelined (docs/bench-h200.md, session 20).
"""

import itertools
import math
import sys

import torch
import torch.nn.functional as F
from decode_common import graph_time  # this folder: on the path when the script runs

from matvlm_cli.bench.floor import measure_bandwidth
from matvlm_cli.kernels import gemv, sm_count

dev = torch.device("cuda")
HIDDEN, FFN = 2560, 10240
# (rows, columns, folded layer norm, GELU rows) of the teacher step's products, and the two that were
# separate until the merge
SHAPES = {
    "qkv+fc1 (norm, gelu)": (3 * HIDDEN + FFN, HIDDEN, True, (3 * HIDDEN, 3 * HIDDEN + FFN)),
    "qkv+fc1 (plain)": (3 * HIDDEN + FFN, HIDDEN, False, (0, 0)),
    "qkv (plain)": (3 * HIDDEN, HIDDEN, False, (0, 0)),
    "fc1 (plain)": (FFN, HIDDEN, False, (0, 0)),
    "dense": (HIDDEN, HIDDEN, False, (0, 0)),
    "fc2": (HIDDEN, FFN, False, (0, 0)),
}
SWEEP = {"qkv+fc1 (norm, gelu)", "qkv+fc1 (plain)", "dense", "fc2"}


def weights(n, k):
    copies = max(4, math.ceil(400e6 / (n * k * 2)))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    bs = [torch.randn(n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    return ws, bs


def describe(tile):
    return f"rows {tile.rows:>2} cols {tile.cols:>3} warps {tile.warps} stages {tile.stages}"


def main():
    sms = sm_count(dev)
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, measured bandwidth {measure_bandwidth(dev) / 1e12:.2f} TB/s")
    x = torch.randn(1, 1, HIDDEN * 4, device=dev, dtype=torch.bfloat16)
    for name, (n, k, norm, gelu) in SHAPES.items():
        ws, bs = weights(n, k)
        xk = x[..., :k].contiguous()
        scale = torch.rand(k, device=dev) + 0.5 if norm else None
        row_sums = [(w.float() @ scale).contiguous() for w in ws] if norm else [None] * len(ws)
        tb = n * k * 2 / 1e12
        print(f"\n{name}: {n} x {k}, {n * k * 2 / 1e6:.1f} MB, {len(ws)} copies; engine tiles {gemv.tiles(n, k, sms)}")

        def report(label, fn):
            t = graph_time(lambda: [fn(i) for i in range(len(ws))]) / len(ws)
            print(f"  {label:<34} {t * 1e6:7.2f} us  {tb / t:5.2f} TB/s", flush=True)
            return t

        report("cuBLAS F.linear", lambda i: F.linear(xk, ws[i], bs[i]))
        report("engine gemv op", lambda i: gemv.gemv(xk, ws[i], bs[i], *gelu, scale, row_sums[i], 1e-5))
        if name not in SWEEP:
            continue
        results = []

        def sweep(tiles):
            for tile in tiles:
                try:
                    t = graph_time(lambda: [gemv.launch(gemv._gemv_kernel, xk, ws[i], bs[i], *gelu, scale, row_sums[i], 1e-5,
                                                        tile=tile) for i in range(len(ws))]) / len(ws)
                except Exception as error:  # a tile that does not compile or fit: say so, go on
                    print(f"  {describe(tile)}: {type(error).__name__}")
                    continue
                results.append((t, tile))
            results.sort()

        sweep(gemv.Tile(*tile) for tile in itertools.product((2, 4, 8, 16), (128, 256, 512), (4, 8), (1, 3))
              if tile[0] * tile[1] <= 8192)
        sweep(best._replace(stages=stages) for _, best in results[:3] for stages in (2, 4, 6))
        for t, tile in results[:8]:
            print(f"  {describe(tile):<34} {t * 1e6:7.2f} us  {tb / t:5.2f} TB/s")
        print(f"  ({len(results)} tiles; slowest {results[-1][0] * 1e6:.2f} us)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
