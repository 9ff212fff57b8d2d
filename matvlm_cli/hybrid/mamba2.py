"""The Mamba-2 mixer that takes the place of an attention module inside a decoder layer.

Parameter names and maths follow mamba_ssm's `Mamba2`, so weights move between the two 1:1:
`in_proj` -> [z, x, B, C, dt]; `conv1d` (depthwise, causal) over [x, B, C]; `dt_bias`, `A_log`, `D`;
`norm` (gated RMSNorm, groups of d_inner / ngroups, gate applied before the norm); `out_proj`.

It is called exactly like the attention module it replaces (`hidden_states` plus the decoder's
keyword arguments) and returns `(output, None)`, so the decoder layer, its norms, MLP and residual
wiring (serial Llama blocks, parallel Phi blocks) stay the teacher's code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .cache import PaddingMaskTap, mamba_cache_slot
from .mixer_config import Mamba2Config
from .ssd import causal_conv1d, causal_conv1d_step, ssd_chunk_scan, ssd_step


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) over groups of `group_size` channels (mamba_ssm's RMSNormGated with
    norm_before_gate=False)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return group_rms_norm(x.float() * F.silu(z.float()), self.weight, self.group_size, self.eps).to(x.dtype)


def group_rms_norm(x: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """RMSNorm over each group of `group_size` channels of the last dimension, in fp32, times `weight`."""
    grouped = x.float().unflatten(-1, (-1, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return grouped.flatten(-2) * weight.float()


class GroupRMSNorm(nn.Module):
    """RMSNorm over each group of `group_size` channels of the last dimension, with a gain per channel."""

    def __init__(self, hidden_size: int, group_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_rms_norm(x, self.weight, self.group_size, self.eps).to(x.dtype)


class Mamba2Mixer(nn.Module):
    _no_weight_decay = ("A_log", "D", "dt_bias")

    def __init__(self, config: Mamba2Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(config.d_model, config.in_proj_dim, bias=config.bias, **factory)
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, config.d_conv,
            groups=config.conv_dim, padding=config.d_conv - 1, bias=config.conv_bias, **factory,
        )
        self.dt_bias = nn.Parameter(torch.empty(config.nheads, **factory))
        self.A_log = nn.Parameter(torch.empty(config.nheads, **factory))
        self.D = nn.Parameter(torch.empty(config.nheads, **factory))
        self.norm = GatedRMSNorm(
            config.d_inner, config.d_inner // config.ngroups, eps=config.norm_eps, **factory
        )
        self.out_proj = nn.Linear(config.d_inner, config.d_model, bias=config.bias, **factory)
        if config.bc_norm_eps is not None:  # a teacher's q_norm / k_norm, as norms on C / B (conversion.py)
            width = config.ngroups * config.d_state
            self.B_norm = GroupRMSNorm(width, config.d_state, config.bc_norm_eps, **factory)
            self.C_norm = GroupRMSNorm(width, config.d_state, config.bc_norm_eps, **factory)
        # Set by the conversion; not a submodule, so it is neither saved nor moved.
        self.padding_mask_tap: PaddingMaskTap | None = None
        if self.dt_bias.device.type != "meta":
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """Standard Mamba-2 initialisation of dt_bias, A_log and D (mamba_ssm's recipe)."""
        cfg = self.config
        u = torch.rand(cfg.nheads, generator=generator)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        low, high = cfg.A_init_range
        A = torch.empty(cfg.nheads).uniform_(low, high, generator=generator)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        padding_mask: torch.Tensor | None = None,
        past_key_values=None,
        seq_idx: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """`seq_idx` (batch, length): packed records, each position's record (transformers' name, as its
        DataCollatorWithFlattening and Bamba use it); `cu_seq_lens_q`: the same boundaries over the flattened
        rows. Neither the conv nor the scan then carries anything from one record into the next."""
        cfg = self.config
        batch, length, _ = hidden_states.shape
        # transformers >= 5.2x names the cache `cache`; 5.17 names it `past_key_values`.
        cache = cache if cache is not None else past_key_values
        slot = mamba_cache_slot(cache, self.layer_idx) if cache is not None else None
        has_state = slot is not None and slot.has_previous_state[0] and slot.is_recurrent_states_initialized[0]
        if padding_mask is None and self.padding_mask_tap is not None and length > 1:
            padding_mask = self.padding_mask_tap.for_last(length)

        projected = self.in_proj(hidden_states)
        conv_weight = self.conv1d.weight.squeeze(1)
        # The fused one-token step has no B/C norms.
        fused_step = kernels.kernel("mixer_step", projected) if has_state and length == 1 and cfg.bc_norm_eps is None else None
        if fused_step is not None:
            y = fused_step(
                projected[:, 0], slot.conv_states[0], conv_weight, self.conv1d.bias, self.dt_bias, self.A_log,
                self.D, slot.recurrent_states[0], self.norm.weight, cfg.ngroups, cfg.d_state, *cfg.dt_bounds,
                self.norm.eps,
            )
            if y is not None:  # None: states in a layout the kernel does not index
                # y comes in in_proj's dtype, so the cast is a no-op unless out_proj's weights differ from it
                return self.out_proj(y.unsqueeze(1).to(self.out_proj.weight.dtype)), None

        z, xBC, dt = projected.split([cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)
        A = -torch.exp(self.A_log.float())
        dt_low, dt_high = cfg.dt_bounds
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(dt_low, dt_high)

        if has_state and length == 1:
            xBC = causal_conv1d_step(xBC[:, 0], slot.conv_states[0], conv_weight, self.conv1d.bias)
            x, B, C = self._split_xBC(xBC)
            y = ssd_step(slot.recurrent_states[0], x, dt[:, 0], A, B, C, self.D)
            y = y.reshape(batch, 1, cfg.d_inner)
        else:
            if padding_mask is not None:
                # Padded steps get no input and no decay, so they never reach the state.
                keep = padding_mask.to(xBC.dtype).unsqueeze(-1)
                xBC = xBC * keep
                dt = dt * keep
            conv_input = xBC.transpose(1, 2)
            if slot is not None:
                # Prepends the cached window when continuing, and stores the last d_conv inputs.
                conv_input = slot.update_conv_state(conv_input, conv_kernel_size=cfg.d_conv)
            if seq_idx is not None and slot is not None:
                raise ValueError("packed records (seq_idx) are a training input; a cache holds one sequence per row")
            xBC = causal_conv1d(conv_input, conv_weight, self.conv1d.bias, seq_idx, cu_seq_lens_q)[..., -length:].transpose(1, 2)
            x, B, C = self._split_xBC(xBC)
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, z, self.D, self.norm.weight))
            # the skip term then goes to the fused norm, which reads x anyway
            fused_norm = kernels.kernel("skip_gate_norm", x, needs_grad)
            y, final_state = ssd_chunk_scan(
                x, dt, A, B, C, cfg.chunk_size, D=None if fused_norm else self.D,
                initial_states=slot.recurrent_states[0] if has_state else None, seq_idx=seq_idx,
            )
            if slot is not None:
                slot.update_recurrent_state(final_state)
            if fused_norm is not None:
                out = fused_norm(
                    y.reshape(batch, length, cfg.d_inner), x.reshape(batch, length, cfg.d_inner), self.D, z,
                    self.norm.weight, self.norm.group_size, cfg.headdim, self.norm.eps, self.out_proj.weight.dtype,
                )
                return self.out_proj(out), None
            y = y.reshape(batch, length, cfg.d_inner)

        y = self.norm(y, z)
        return self.out_proj(y.to(self.out_proj.weight.dtype)), None

    def _split_xBC(self, xBC: torch.Tensor):
        cfg = self.config
        x, B, C = xBC.split([cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        if cfg.bc_norm_eps is not None:
            B, C = self.B_norm(B), self.C_norm(C)
        lead = x.shape[:-1]
        return (
            x.reshape(*lead, cfg.nheads, cfg.headdim),
            B.reshape(*lead, cfg.ngroups, cfg.d_state),
            C.reshape(*lead, cfg.ngroups, cfg.d_state),
        )

    def extra_repr(self) -> str:
        c = self.config
        return f"layer_idx={self.layer_idx}, nheads={c.nheads}, headdim={c.headdim}, d_state={c.d_state}, ngroups={c.ngroups}"
