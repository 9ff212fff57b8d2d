"""One Triton kernel for a whole Mamba-2 decode step, between `in_proj` and `out_proj`.

Decoding one token through the mixer is a dozen small operations: the conv window shift and its
product, SiLU, softplus of dt, the decay, the state update, the read-out with C, the skip term,
the gate and the grouped RMSNorm. Each is a kernel of a microsecond or two that moves almost
nothing, so a decode step spends more time launching them than reading the 0.8 MB state they
share (`docs/bench.md` has the profile). This kernel does all of it in one launch, with one
program per (sequence, group): the heads of one group share B and C and one norm, so no program
needs another's results. It updates the conv window and the SSM state in place (static buffers
for CUDA graphs) and returns the normalised, gated output.

The maths is `ssd.causal_conv1d_step`, `ssd.ssd_step` and `mamba2.GatedRMSNorm`, which stay the
reference that the tests compare it with. It needs only Triton, which CUDA builds of torch bring.
"""

from __future__ import annotations

import torch

from . import pdl

try:  # CUDA builds of torch bring Triton; elsewhere the PyTorch step runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _conv_channels(Inputs, ConvState, ConvWeight, ConvBias, channel, in_channel, window_pos, in_window,
                      D_CONV: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The conv over `channel`s for the new token; returns (silu output, new window)."""
        shifted = tl.load(ConvState + channel[:, None] * D_CONV + window_pos[None, :] + 1,
                          mask=in_channel[:, None] & (window_pos[None, :] + 1 < D_CONV), other=0.0).to(tl.float32)
        new = tl.load(Inputs + channel, mask=in_channel, other=0.0).to(tl.float32)
        window = tl.where(window_pos[None, :] == D_CONV - 1, new[:, None], shifted)
        weight = tl.load(ConvWeight + channel[:, None] * D_CONV + window_pos[None, :],
                         mask=in_channel[:, None] & in_window[None, :], other=0.0).to(tl.float32)
        out = tl.sum(window * weight, axis=1)
        if HAS_BIAS:
            out += tl.load(ConvBias + channel, mask=in_channel, other=0.0).to(tl.float32)
        return out * tl.sigmoid(out), window

    @triton.jit
    def _mamba2_step_kernel(Inputs, ConvState, ConvWeight, ConvBias, DtBias, ALog, Skip, State, NormWeight, Out, Result,
                    stride_in, stride_conv, stride_state, stride_out, stride_result, dt_low, dt_high, eps,
                    D_INNER: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, GROUPS: tl.constexpr,
                    HEADDIM: tl.constexpr, D_STATE: tl.constexpr, D_CONV: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr):
        seq, group = tl.program_id(0), tl.program_id(1)
        if USE_PDL:  # the inputs are in_proj's output (kernels.pdl)
            tl.extra.cuda.gdc_wait()
        conv_dim = D_INNER + 2 * GROUPS * D_STATE
        Inputs += seq * stride_in  # [z, x, B, C, dt], as in_proj writes them
        ConvState += seq * stride_conv
        State += seq * stride_state
        Out += seq * stride_out
        Result += seq * stride_result
        xBC = Inputs + D_INNER
        w = tl.arange(0, BLOCK_W)
        in_window = w < D_CONV
        n = tl.arange(0, BLOCK_N)
        in_n = n < D_STATE
        p = tl.arange(0, BLOCK_P)
        in_p = p < HEADDIM

        b_channel = D_INNER + group * D_STATE + n
        B, b_window = _conv_channels(xBC, ConvState, ConvWeight, ConvBias, b_channel, in_n, w, in_window, D_CONV, HAS_BIAS)
        c_channel = D_INNER + (GROUPS + group) * D_STATE + n
        C, c_window = _conv_channels(xBC, ConvState, ConvWeight, ConvBias, c_channel, in_n, w, in_window, D_CONV, HAS_BIAS)
        window_mask = in_n[:, None] & in_window[None, :]
        tl.debug_barrier()  # every window is read before any is shifted in place
        tl.store(ConvState + b_channel[:, None] * D_CONV + w[None, :], b_window.to(ConvState.dtype.element_ty), mask=window_mask)
        tl.store(ConvState + c_channel[:, None] * D_CONV + w[None, :], c_window.to(ConvState.dtype.element_ty), mask=window_mask)

        squares = tl.zeros([BLOCK_P], tl.float32)
        for i in tl.static_range(HEADS_PER_GROUP):
            head = group * HEADS_PER_GROUP + i
            x_channel = head * HEADDIM + p
            x, x_window = _conv_channels(xBC, ConvState, ConvWeight, ConvBias, x_channel, in_p, w, in_window, D_CONV, HAS_BIAS)
            tl.debug_barrier()
            tl.store(ConvState + x_channel[:, None] * D_CONV + w[None, :], x_window.to(ConvState.dtype.element_ty),
                     mask=in_p[:, None] & in_window[None, :])

            dt = tl.load(Inputs + D_INNER + conv_dim + head).to(tl.float32) + tl.load(DtBias + head).to(tl.float32)
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, as torch computes it
            dt = tl.minimum(tl.maximum(dt, dt_low), dt_high)
            decay = tl.exp(-dt * tl.exp(tl.load(ALog + head).to(tl.float32)))

            state_ptrs = State + head * HEADDIM * D_STATE + p[:, None] * D_STATE + n[None, :]
            state_mask = in_p[:, None] & in_n[None, :]
            state = tl.load(state_ptrs, mask=state_mask, other=0.0)
            state = state * decay + (dt * x)[:, None] * B[None, :]
            tl.store(state_ptrs, state, mask=state_mask)
            y = tl.sum(state * C[None, :], axis=1) + tl.load(Skip + head).to(tl.float32) * x

            z = tl.load(Inputs + x_channel, mask=in_p, other=0.0).to(tl.float32)
            y = tl.where(in_p, y * z * tl.sigmoid(z), 0.0)
            squares += y * y
            tl.store(Out + x_channel, y, mask=in_p)  # gated, not yet normalised (float32 scratch)
        if USE_PDL:  # out_proj may be scheduled now; it waits for this kernel's end before it reads Out
            tl.extra.cuda.gdc_launch_dependents()

        scale = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / (HEADS_PER_GROUP * HEADDIM) + eps)
        for i in tl.static_range(HEADS_PER_GROUP):
            x_channel = (group * HEADS_PER_GROUP + i) * HEADDIM + p
            y = tl.load(Out + x_channel, mask=in_p, other=0.0)
            norm_weight = tl.load(NormWeight + x_channel, mask=in_p, other=0.0).to(tl.float32)
            # rounded once, to the dtype out_proj reads: no cast kernel between this step and out_proj
            tl.store(Result + x_channel, (y * scale * norm_weight).to(Result.dtype.element_ty), mask=in_p)


# Opaque to torch.compile, and it says what it changes in place, so a compiled decode step keeps the
# static state buffers.
@torch.library.custom_op("matvlm::mamba2_step", mutates_args=("conv_state", "ssm_state"))
def mamba2_step(
    inputs: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, ssm_state: torch.Tensor, norm_weight: torch.Tensor,
    ngroups: int, d_state: int, dt_low: float, dt_high: float, eps: float,
) -> torch.Tensor:
    """inputs (b, in_proj_dim) = [z, x, B, C, dt]; conv_state (b, conv_dim, d_conv) and ssm_state
    (b, heads, headdim, d_state), both updated in place. Returns the normalised gated output
    (b, d_inner) in the inputs' dtype (in_proj's, which out_proj reads), computed in float32."""
    batch = inputs.shape[0]
    heads, headdim = ssm_state.shape[1], ssm_state.shape[2]
    d_inner, d_conv = heads * headdim, conv_state.shape[-1]
    # float32 scratch for the gated output before its norm, and the result in the inputs' dtype
    out = torch.empty(batch, d_inner, device=inputs.device, dtype=torch.float32)
    result = torch.empty(batch, d_inner, device=inputs.device, dtype=inputs.dtype)
    use_pdl = pdl(inputs.device)
    _mamba2_step_kernel[(batch, ngroups)](
        inputs, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state, norm_weight, out, result,
        inputs.stride(0), conv_state.stride(0), ssm_state.stride(0), out.stride(0), result.stride(0), dt_low, dt_high, eps,
        D_INNER=d_inner, HEADS_PER_GROUP=heads // ngroups, GROUPS=ngroups, HEADDIM=headdim, D_STATE=d_state,
        D_CONV=d_conv, HAS_BIAS=conv_bias is not None, BLOCK_P=triton.next_power_of_2(headdim),
        BLOCK_N=triton.next_power_of_2(d_state), BLOCK_W=triton.next_power_of_2(d_conv),
        num_warps=4 if headdim * d_state <= 64 * 64 else 8, USE_PDL=use_pdl, launch_pdl=use_pdl,
    )
    return result


@mamba2_step.register_fake
def _(inputs, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state, norm_weight, ngroups, d_state, dt_low, dt_high, eps):
    return inputs.new_empty(inputs.shape[0], ssm_state.shape[1] * ssm_state.shape[2])


def fused_step(
    inputs: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, ssm_state: torch.Tensor, norm_weight: torch.Tensor,
    ngroups: int, d_state: int, dt_low: float, dt_high: float, eps: float,
) -> torch.Tensor | None:
    """`mamba2_step`, or None where the tensors are not in the layouts the kernel indexes directly
    (contiguous rows, windows and float32 states); the caller then runs the PyTorch step."""
    usable = (
        inputs.stride(-1) == 1 and conv_state.stride(-1) == 1 and conv_state.stride(-2) == conv_state.shape[-1]
        and ssm_state.stride(-1) == 1 and ssm_state.stride(-2) == ssm_state.shape[-1]
        and ssm_state.stride(1) == ssm_state.shape[-1] * ssm_state.shape[-2] and ssm_state.dtype == torch.float32
        and conv_weight.is_contiguous()
    )
    if not usable:
        return None
    return mamba2_step(inputs, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state, norm_weight,
                       ngroups, d_state, dt_low, dt_high, eps)
