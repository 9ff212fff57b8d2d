"""One decoding token's key and value into a static KV cache, and its length advanced, in one kernel.

transformers' `StaticLayer.update` (5.17 to 5.25) writes a token with two `index_copy_` calls at the
layer's `cumulative_length`, a device counter, and advances the counter in place: under inductor three
kernels a layer, 1.1-1.4 us each on an H200 at batch 1, whose work is 10 KB of copies (the PDL profile,
`docs/results/bench/decode-profile-hybrid-0.5-8192-h200-pdl.txt`: `..._index_copy_6`, `..._index_copy_..._7`,
`triton_poi_fused_add_copy__14`). `write_token` does all three in one program: it reads the counter,
writes the key and value at that slot, and stores the counter plus one, the same state as the stock update
leaves. The graphs engine's static cache calls it for one sequence's one token on CUDA (`takes`);
everything else takes the stock path (`bench/static_cache.py`).
"""

from __future__ import annotations

import torch

from . import pdl

try:  # CUDA builds of torch bring Triton; elsewhere the stock update runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _write_token_kernel(Keys, Values, Key, Value, Length, heads, slots, sk_h, sk_n, sv_h, sv_n, snk_h, snv_h,
                            K_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                            USE_PDL: tl.constexpr):
        # One program for every head: a batch-1 token is a few KB, so one program is the cheapest launch, and
        # only one program reads and advances the counter.
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        if USE_PDL:  # the key and value come from the kernels before (kernels.pdl)
            tl.extra.cuda.gdc_wait()
        slot = tl.load(Length)
        key = tl.load(Key + h * snk_h + d, mask=(h < heads) & (d < K_DIM))
        value = tl.load(Value + h * snv_h + d, mask=(h < heads) & (d < V_DIM))
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        # a full cache is left as it is (never written out of bounds); the counter still moves, as the stock
        # update's would before its index_copy_ failed
        writes = (h < heads) & (h * 0 + slot < slots)
        tl.store(Keys + h * sk_h + slot * sk_n + d, key, mask=writes & (d < K_DIM))
        tl.store(Values + h * sv_h + slot * sv_n + d, value, mask=writes & (d < V_DIM))
        tl.store(Length, slot + 1)


@torch.library.custom_op("matvlm::write_token", mutates_args=("keys", "values", "length"))
def write_token(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor, length: torch.Tensor) -> None:
    """keys/values (1, heads, slots, dim) with unit stride in dim; key/value (1, heads, 1, dim); length a
    one-element int64 counter: writes key and value at slot `length`, then adds 1 to it."""
    heads = keys.shape[1]
    k_dim, v_dim = keys.shape[-1], values.shape[-1]
    use_pdl = pdl(keys.device)
    _write_token_kernel[(1,)](
        keys, values, key, value, length, heads, keys.shape[2], keys.stride(1), keys.stride(2), values.stride(1), values.stride(2),
        key.stride(1), value.stride(1), K_DIM=k_dim, V_DIM=v_dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(max(k_dim, v_dim)), USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl,
    )


def takes(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor, length: torch.Tensor) -> bool:
    """Whether `write_token` handles this update: one sequence's one token on CUDA, the cache and the new
    states alike in dtype, unit strides in the head dimension, a one-element integer counter."""
    return (
        triton is not None and keys.is_cuda and keys.shape[0] == 1 and key.shape[0] == 1 and key.shape[-2] == 1
        and key.dtype == value.dtype == keys.dtype
        and key.stride(-1) == value.stride(-1) == keys.stride(-1) == values.stride(-1) == 1
        and length.numel() == 1 and length.dtype == torch.int64 and length.device == keys.device
    )
