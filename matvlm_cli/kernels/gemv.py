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
product only fc1's rows), or the gate rows of Gemma's gate/up product. And the input may be the raw input of
the norm before the product (a layer or RMS norm): the kernel normalises it as it streams it. Only the
kernel does these; where F.linear runs, the norm and activation modules still do (`bench/folds.py`).
Last, the compiled step may hand the kernel the tensor that the model adds the product to (a residual
stream, or a parallel block's other product): it adds it before the one store (`bench/residual_fold.py`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import pdl, sm_count

try:  # CUDA builds of torch bring Triton; elsewhere F.linear runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    # The kernel in three pieces, which Triton inlines: a tile of weights, the products with one tile of x, and
    # the end (norm, bias, GELU, residual, store). experiments/gpu/gemv_prefetch.py orders them differently.

    @triton.jit
    def weight_tile(W, rows, in_rows, cols, K, EVEN_K: tl.constexpr):
        # (BLOCK_N, BLOCK_K) weights of this program's rows
        if EVEN_K:
            return tl.load(W + rows[:, None] * K + cols[None, :], mask=in_rows[:, None], other=0.0)
        return tl.load(W + rows[:, None] * K + cols[None, :], mask=in_rows[:, None] & (cols < K)[None, :], other=0.0)

    @triton.jit
    def accumulate(acc, sums, squares, w, X, NormScale, cols, K, EVEN_K: tl.constexpr, NORM: tl.constexpr):
        # the products of one weight tile with its columns of x, summed into the (BLOCK_N, BLOCK_K) tile
        if EVEN_K:
            x = tl.load(X + cols).to(tl.float32)
        else:
            x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
        if NORM:
            sums += x
            squares += x * x
            if EVEN_K:
                x = x * tl.load(NormScale + cols).to(tl.float32)
            else:
                x = x * tl.load(NormScale + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        return acc, sums, squares

    @triton.jit
    def finish(acc, sums, squares, rows, in_rows, Bias, Y, NormRowSums, Residual, K, gelu_start, gelu_end, norm_eps,
               HAS_BIAS: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr, CENTERED: tl.constexpr,
               RESIDUAL: tl.constexpr):
        y = tl.sum(acc, axis=1)
        if NORM:  # y holds W (scale * x); the norm's mean and spread apply to the whole row at once
            mean_square = tl.sum(squares, axis=0) / K
            if CENTERED:  # W (scale * (x - mean)) = y - mean * (W scale), the row sums given
                mean = tl.sum(sums, axis=0) / K
                y = (y - mean * tl.load(NormRowSums + rows, mask=in_rows, other=0.0)) * tl.rsqrt(tl.maximum(mean_square - mean * mean, 0.0) + norm_eps)
            else:
                y = y * tl.rsqrt(mean_square + norm_eps)
        if HAS_BIAS:
            y += tl.load(Bias + rows, mask=in_rows, other=0.0).to(tl.float32)
        if GELU:  # tanh GELU, 0.5 y (1 + tanh(u)), written as y sigmoid(2u): u = sqrt(2/pi) (y + 0.044715 y^3)
            gelu = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
            y = tl.where((rows >= gelu_start) & (rows < gelu_end), gelu, y)
        if RESIDUAL:  # the sum the model adds the product to (bench/residual_fold.py)
            y += tl.load(Residual + rows, mask=in_rows, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=in_rows)

    @triton.jit
    def _gemv_kernel(X, W, Bias, Y, NormScale, NormRowSums, Residual, N, K, gelu_start, gelu_end, norm_eps,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr,
                     CENTERED: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr, USE_PDL: tl.constexpr):
        # One program: BLOCK_N output rows. The products are summed in a (BLOCK_N, BLOCK_K) tile and
        # reduced once at the end, so the loop is loads and fused multiply-adds only. With STAGES > 1, Triton
        # pipelines the weight loads: STAGES - 1 tiles ahead, through shared memory (cp.async). The loop says so
        # itself: a launch's num_stages reaches only loops with a tl.dot, and this one has none.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows = rows < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sums = tl.zeros([BLOCK_K], tl.float32)  # with NORM: x's sum and sum of squares, as x streams by
        squares = tl.zeros([BLOCK_K], tl.float32)
        if USE_PDL:  # x is the previous kernel's output (kernels.pdl)
            tl.extra.cuda.gdc_wait()
        for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            cols = k + tl.arange(0, BLOCK_K)
            w = weight_tile(W, rows, in_rows, cols, K, EVEN_K)
            acc, sums, squares = accumulate(acc, sums, squares, w, X, NormScale, cols, K, EVEN_K, NORM)
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        finish(acc, sums, squares, rows, in_rows, Bias, Y, NormRowSums, Residual, K, gelu_start, gelu_end, norm_eps,
               HAS_BIAS, GELU, NORM, CENTERED, RESIDUAL)


class Tile(NamedTuple):
    """How `_gemv_kernel` cuts a product: `rows` output rows a program, `cols` columns a load, `warps` a
    program, and `stages`, the weight tiles in flight through shared memory (1: loads straight into registers,
    no pipelining)."""

    rows: int
    cols: int
    warps: int
    stages: int = 1


def tiles(out_features: int, in_features: int, sms: int) -> Tile:
    """The engine's tile for a product: the most rows, up to 8, that still leave 8 programs per SM, 256
    columns a load, 4 warps, unpipelined (the best tiles of the H200 sweep for Phi-2's q/k/v and fc1, and
    for the merged q/k/v/fc1, within 0.3 us; 3 stages gain nothing there). A product with too few outputs
    for 4 rows at 8 programs per SM (Phi-2's dense and fc2) takes 4 rows of 512 columns with the loop
    pipelined 4 stages deep instead: fc2 (2560 x 10240) in 14.7 us against 17.9 at the 4 x 128 tile it had,
    dense (2560 x 2560) in 5.2 against 5.5 at 2 x 512 (`experiments/gpu/gemv_probe.py`,
    docs/results/bench/gemv-probe-h200-stages.txt, session 21)."""
    for rows in (8, 4):
        if -(-out_features // rows) >= 8 * sms:
            return Tile(rows, 256, 4)
    return Tile(4, 512, 4, stages=4)


@torch.library.custom_op("matvlm::gemv", mutates_args=())
def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_start: int = 0, gelu_end: int = 0,
    norm_scale: torch.Tensor | None = None, norm_row_sums: torch.Tensor | None = None, norm_eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., in) holding one row; weight (out, in) contiguous; output rows gelu_start .. gelu_end - 1 go
    through the tanh GELU. With `norm_scale` (in,), x is the raw input of an RMS norm, or of a
    layer norm when `norm_row_sums` (out,) float32 = weight @ norm_scale is given; eps `norm_eps`
    (bench/folds.py). With `residual`, contiguous and of the output's shape and dtype, returns the product plus
    it, rounded once (bench/residual_fold.py). Returns (..., out) in x's dtype."""
    return launch(_gemv_kernel, x, weight, bias, gelu_start, gelu_end, norm_scale, norm_row_sums, norm_eps, residual)


def launch(kernel, x, weight, bias, gelu_start=0, gelu_end=0, norm_scale=None, norm_row_sums=None, norm_eps=0.0,
           residual=None, tile: Tile | None = None, **constants) -> torch.Tensor:
    """`gemv`'s launch (its grid, PDL where it is on) of `kernel`, with the engine's tile unless `tile` is
    given: `_gemv_kernel`, or a variant with its arguments and `constants` more (experiments/gpu/gemv_probe.py,
    gemv_prefetch.py)."""
    out_features, in_features = weight.shape
    y = torch.empty(*x.shape[:-1], out_features, device=x.device, dtype=x.dtype)
    rows, cols, warps, stages = tile or tiles(out_features, in_features, sm_count(x.device))
    use_pdl = pdl(x.device)
    kernel[(triton.cdiv(out_features, rows),)](
        x, weight, y if bias is None else bias, y, y if norm_scale is None else norm_scale,
        y if norm_row_sums is None else norm_row_sums, y if residual is None else residual, out_features, in_features,
        gelu_start, gelu_end, norm_eps,
        HAS_BIAS=bias is not None, EVEN_K=in_features % cols == 0, GELU=gelu_end > gelu_start,
        NORM=norm_scale is not None, CENTERED=norm_row_sums is not None, RESIDUAL=residual is not None,
        BLOCK_N=rows, BLOCK_K=cols, STAGES=stages,
        USE_PDL=use_pdl, num_warps=warps, num_stages=stages, launch_pdl=use_pdl, **constants,
    )
    return y


@gemv.register_fake
def _(x, weight, bias, gelu_start=0, gelu_end=0, norm_scale=None, norm_row_sums=None, norm_eps=0.0, residual=None):
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
