"""How the one-token GEMV should use programmatic dependent launch (kernels.pdl), on the GPU machine:

    python experiments/gpu/pdl_gemv.py > docs/results/bench/pdl-gemv-h200.txt

A decode step's linear layers as the graphs engine runs them for Phi-2 (TinyLLaVA's language model):
32 layers of q/k/v, dense, fc1 and fc2 GEMVs with distinct weights, with a small elementwise kernel
(launched as inductor launches its own with PDL: wait, load, let the next start, compute, store) between
them where the model has one. Captured as one CUDA graph and replayed, for each way of launching.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from graph_timing import graph_time  # this folder: on the path when the script runs

from matvlm_cli import kernels
from matvlm_cli.bench.floor import measure_bandwidth
from matvlm_cli.kernels import gemv as gemv_module

dev = torch.device("cuda")
LAYERS, HIDDEN, MLP = 32, 2560, 10240


@triton.jit
def scale_kernel(X, Y, n, USE_PDL: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(X + offsets, mask=offsets < n)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(Y + offsets, x * 1.0001, mask=offsets < n)


def elementwise(x):
    y = torch.empty_like(x)
    use = kernels.pdl(dev)
    scale_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), USE_PDL=use, BLOCK=1024, launch_pdl=use)
    return y


def step(x, layers, between):
    for qkv, dense, fc1, fc2 in layers:
        q = gemv_module.gemv(x, *qkv)
        q = elementwise(q) if between else q
        gemv_module.gemv(q[:HIDDEN], *dense)
        h = gemv_module.gemv(x, *fc1)
        h = elementwise(h) if between else h
        out = gemv_module.gemv(h, *fc2)
        x = elementwise(out) if between else out
    return x


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    bw = measure_bandwidth(dev)
    def weights(n_out, n_in):
        return (torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) * 0.02, torch.randn(n_out, device=dev, dtype=torch.bfloat16))
    layers = [(weights(3 * HIDDEN, HIDDEN), weights(HIDDEN, HIDDEN), weights(MLP, HIDDEN), weights(HIDDEN, MLP)) for _ in range(LAYERS)]
    size = sum(w.numel() * 2 for layer in layers for w, _ in layer)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; {size / 1e9:.2f} GB of weights a step: floor {size / bw * 1e3:.3f} ms", flush=True)
    x = torch.randn(HIDDEN, device=dev, dtype=torch.bfloat16)
    ref = F.linear(x.float(), layers[0][0][0].float(), layers[0][0][1].float())
    modes = {
        "no PDL": ("0", False, False),
        "PDL, next launched after the loop": ("1", False, False),
        "PDL, next launched at the start": ("1", True, False),
        "PDL, after the loop, weights prefetched": ("1", False, True),
        "PDL, at the start, weights prefetched": ("1", True, True),
    }
    for between in (False, True):
        print(f"\n== {'with' if between else 'without'} elementwise kernels between the GEMVs ==", flush=True)
        for name, (env, early, prefetch) in modes.items():
            os.environ["MATVLM_PDL"] = env
            kernels.pdl.cache_clear()
            gemv_module.PDL_MODE.update(EARLY_LAUNCH=early, PREFETCH=prefetch)
            err = (gemv_module.gemv(x, *layers[0][0]).float() - ref).abs().max().item()
            t = graph_time(lambda: step(x, layers, between))
            print(f"{name:42s} {t * 1e3:.3f} ms a step, {size / t / 1e9:5.0f} GB/s (q/k/v err {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
