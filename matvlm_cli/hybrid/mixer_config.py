"""Dimensions and initialisation settings of one Mamba-2 mixer.

Stored in a hybrid's `config.json` (under `matvlm.mixer`), so it must round-trip through JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int
    nheads: int
    headdim: int
    d_state: int
    ngroups: int
    d_conv: int = 4
    chunk_size: int = 128
    # (min, max); max None means unbounded. JSON has no infinity, hence None.
    dt_limit: tuple[float, float | None] = (0.0, None)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    bias: bool = False
    conv_bias: bool = True
    norm_eps: float = 1e-5
    # Per-group RMSNorms on B and C (after the convolution), carrying a teacher's per-head q/k norms
    # (Qwen3, Gemma 3); their epsilon, or None for none (Llama, Phi, MaTVLM's layout).
    bc_norm_eps: float | None = None

    def __post_init__(self):
        if self.nheads % self.ngroups:
            raise ValueError(f"nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        # [z, x, B, C, dt], the order of mamba_ssm's Mamba2.in_proj
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def dt_bounds(self) -> tuple[float, float]:
        low, high = self.dt_limit
        return float(low), math.inf if high is None else float(high)

    def state_bytes(self, batch: int = 1, conv_bytes: int = 2, ssm_bytes: int = 4) -> int:
        """Bytes of the fixed per-sequence state: conv window plus SSM state."""
        conv = self.conv_dim * self.d_conv * conv_bytes
        ssm = self.nheads * self.headdim * self.d_state * ssm_bytes
        return batch * (conv + ssm)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Mamba2Config":
        data = dict(data)
        for key in ("dt_limit", "A_init_range"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
