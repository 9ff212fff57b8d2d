"""One Triton kernel for what follows the chunk scan in a Mamba-2 prefill: the skip term, the gate and
the grouped RMSNorm.

In PyTorch these are a dozen elementwise passes over the whole prompt, most in float32: the skip
(y + D x), z and y cast up, SiLU, the product, its square, the mean, the reciprocal root, two products
and the cast back. At 8k tokens and 2560 channels each pass moves 40 to 170 MB, about 1.5 GB a layer,
where the kernel reads y, x and z once and writes the output once (170 MB). One program takes a tile of
tokens of one norm group, so no program needs another's results.

The maths is `mamba2.GatedRMSNorm` with the skip added before it (as `ssd_chunk_scan` adds it), in
float32; that module stays the reference, and what training runs (this kernel has no backward).
"""

from __future__ import annotations

import torch

try:  # CUDA builds of torch bring Triton; elsewhere the PyTorch norm runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _skip_gate_norm_kernel(Y, X, Z, D, Weight, Out, length, rows, eps,
                               sy_b, sy_t, sy_c, sx_b, sx_t, sx_c, sz_b, sz_t, sz_c, so_b, so_t,
                               GROUP: tl.constexpr, HEADDIM: tl.constexpr, HAS_SKIP: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        block, group = tl.program_id(0), tl.program_id(1)
        r = block * BLOCK_R + tl.arange(0, BLOCK_R)
        # rows are (sequence, token) pairs; each tensor has its own strides; 64-bit offsets for long batches
        b, t = (r // length).to(tl.int64), (r % length).to(tl.int64)
        c = tl.arange(0, BLOCK_G)
        channel = group * GROUP + c
        m = (r < rows)[:, None] & (c < GROUP)[None, :]
        y = tl.load(Y + (b * sy_b + t * sy_t)[:, None] + channel[None, :] * sy_c, mask=m, other=0.0).to(tl.float32)
        if HAS_SKIP:
            x = tl.load(X + (b * sx_b + t * sx_t)[:, None] + channel[None, :] * sx_c, mask=m, other=0.0).to(tl.float32)
            skip = tl.load(D + channel // HEADDIM, mask=c < GROUP, other=0.0).to(tl.float32)
            y += x * skip[None, :]
        z = tl.load(Z + (b * sz_b + t * sz_t)[:, None] + channel[None, :] * sz_c, mask=m, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
        scale = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / GROUP + eps)
        weight = tl.load(Weight + channel, mask=c < GROUP, other=0.0).to(tl.float32)
        out = y * scale[:, None] * weight[None, :]
        tl.store(Out + (b * so_b + t * so_t)[:, None] + channel[None, :], out.to(Out.dtype.element_ty), mask=m)


def skip_gate_norm(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor,
                   group_size: int, headdim: int, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over groups of `group_size` channels of (y + D x) * silu(z), times `weight`, in float32.
    y, x, z: (batch, length, d_inner) in any strides (a conv's channels-first output too); D: (heads,), one
    value per `headdim` channels. Returns (batch, length, d_inner) in `out_dtype`, channels-last."""
    batch, length, channels = y.shape
    out = torch.empty(batch, length, channels, device=y.device, dtype=out_dtype)
    rows = batch * length
    block_r = 32
    grid = (triton.cdiv(rows, block_r), channels // group_size)
    _skip_gate_norm_kernel[grid](
        y, x, z, D if D is not None else weight, weight, out, length, rows, eps,
        *y.stride(), *x.stride(), *z.stride(), out.stride(0), out.stride(1),
        GROUP=group_size, HEADDIM=headdim, HAS_SKIP=D is not None, BLOCK_R=block_r,
        BLOCK_G=triton.next_power_of_2(group_size), num_warps=4,
    )
    return out
