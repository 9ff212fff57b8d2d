"""Matrix-vector products for one-token decode steps: a Triton GEMV that streams each weight once.

At batch 1 a decode step's projections are matrix-vector products, and time is bytes: on an H200
cuBLAS reads Phi-2's projections at 1.7-3.2 TB/s of the card's 4.0 (its dense 2560x2560 in 7.6 us against
3.3 us of bytes). This kernel gives each program a few output rows and walks their weights in long
contiguous runs, with enough programs (about 8 per SM) to keep the memory system busy; it reads the same
projections at 2.1-3.6 TB/s, 1.4-2.1 us faster each
(`experiments/gpu/decode_kernels.py`, `docs/results/bench/decode-kernels-h200.txt`).

Only the `graphs` engine calls it (`bench/fusion.py` routes its linear layers here), for one token on
CUDA in half precision; anything else is `F.linear`. Accumulation is float32, as in cuBLAS.

A range of output rows may leave through the tanh GELU (`gemv`'s gelu_start, gelu_end): an MLP's fc1 whose
activation would otherwise be a kernel of its own between two GEMVs (Phi's, and in a merged q/k/v/fc1
product only fc1's rows), or the gate rows of Gemma's gate/up product. Only the kernel does this; where F.linear runs, the activation module still does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pdl, sm_count

try:  # CUDA builds of torch bring Triton; elsewhere F.linear runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _gemv_kernel(X, W, Bias, Y, N, K, gelu_start, gelu_end, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     GELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        # One program: BLOCK_N output rows. The products are summed in a (BLOCK_N, BLOCK_K) tile and
        # reduced once at the end, so the loop is loads and fused multiply-adds only.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows = rows < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if USE_PDL:  # x is the previous kernel's output (kernels.pdl)
            tl.extra.cuda.gdc_wait()
        for k in range(0, K, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x = tl.load(X + cols)
                w = tl.load(W + rows[:, None] * K + cols[None, :], mask=in_rows[:, None], other=0.0)
            else:
                in_cols = cols < K
                x = tl.load(X + cols, mask=in_cols, other=0.0)
                w = tl.load(W + rows[:, None] * K + cols[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :].to(tl.float32)
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(Bias + rows, mask=in_rows, other=0.0).to(tl.float32)
        if GELU:  # tanh GELU, 0.5 y (1 + tanh(u)), written as y sigmoid(2u): u = sqrt(2/pi) (y + 0.044715 y^3)
            gelu = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
            y = tl.where((rows >= gelu_start) & (rows < gelu_end), gelu, y)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=in_rows)


def tiles(out_features: int, sms: int) -> tuple[int, int]:
    """(rows per program, columns per load). The most rows, up to 8, that still leave 8 programs per SM;
    512 columns a load at 1-2 rows, 256 at more (the best tiles of the H200 sweep for Phi-2's q/k/v,
    dense, fc1 and fc2, within 0.1 us)."""
    rows = 8
    while rows > 1 and -(-out_features // rows) < 8 * sms:
        rows //= 2
    return rows, 512 if rows <= 2 else 256


@torch.library.custom_op("matvlm::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_start: int = 0, gelu_end: int = 0) -> torch.Tensor:
    """x (..., in) holding one row; weight (out, in) contiguous; output rows gelu_start .. gelu_end - 1 go
    through the tanh GELU. Returns (..., out) in x's dtype."""
    out_features, in_features = weight.shape
    y = torch.empty(*x.shape[:-1], out_features, device=x.device, dtype=x.dtype)
    rows, cols = tiles(out_features, sm_count(x.device))
    use_pdl = pdl(x.device)
    _gemv_kernel[(triton.cdiv(out_features, rows),)](
        x, weight, y if bias is None else bias, y, out_features, in_features, gelu_start, gelu_end,
        HAS_BIAS=bias is not None, EVEN_K=in_features % cols == 0, GELU=gelu_end > gelu_start, BLOCK_N=rows,
        BLOCK_K=cols, USE_PDL=use_pdl, num_warps=4, num_stages=3, launch_pdl=use_pdl,
    )
    return y


@gemv.register_fake
def _(x, weight, bias, gelu_start=0, gelu_end=0):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the GEMV kernel computes this product: x one token on CUDA in half precision, every operand
    contiguous and of x's dtype."""
    return (
        triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        and x.shape[:-1].numel() == 1 and x.is_contiguous() and weight.is_contiguous()
        and weight.dtype == x.dtype and (bias is None or bias.is_contiguous())
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, by the GEMV kernel where it `takes` the product."""
    return gemv(x, weight, bias) if takes(x, weight, bias) else F.linear(x, weight, bias)
