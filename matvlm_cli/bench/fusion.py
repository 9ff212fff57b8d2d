"""The `graphs` engine's projections: one GEMV for q, k and v, and every one-token product on a GEMV kernel.

At batch 1 a decode step is a string of matrix-vector products, and a small one cannot reach the
card's bandwidth: a 13 MB projection of Phi-2 takes 8.3 us on an H100, where its bytes take 4.5 us,
and q, k and v read as one 39 MB matrix take 16.5 us instead of 25 (`docs/bench.md`). So,
as inference engines do, the `graphs` engine concatenates the q, k and v weights of every attention
module and computes them in one product.

It changes no model code. The three projection modules are swapped for slices of one shared
projection, which computes all three when the first is called and hands out the other two from
memory. The original modules keep views of the fused weight, so the weights are held once, and
`unfuse` puts them back (the `hf` engine runs the model as users do).

The same swap sends every other linear layer of the language model (the attention's output, the MLP,
a Mamba layer's in and out projections) through `kernels/gemv.py` while they are fused: for one token on
CUDA that is a Triton GEMV that reads the weights nearer the card's bandwidth than cuBLAS does; for a
prefill chunk, a batch or a CPU it is `F.linear` as before. The modules change class, not weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hybrid.conversion import find_decoder
from ..kernels import gemv

FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"),)


class _Pending:
    """The shared projection's last input and outputs, until every slice has taken its part."""

    def __init__(self):
        self.input = self.outputs = None
        self.left = 0


class SharedProjection(nn.Module):
    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])
        self.weight = nn.Parameter(weight, requires_grad=False)
        has_bias = linears[0].bias is not None
        self.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False) if has_bias else None
        self.sizes = [linear.out_features for linear in linears]
        self.pending = _Pending()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pending = self.pending
        if pending.left == 0 or pending.input is not x:
            pending.input, pending.outputs = x, gemv.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            pending.left = len(self.sizes)
        out = pending.outputs[index]
        pending.left -= 1
        if pending.left == 0:  # let go of the activations
            pending.input = pending.outputs = None
        return out


class ProjectionSlice(nn.Module):
    """Stands in for one of the fused projections, and reads like it (weight, bias, sizes)."""

    def __init__(self, shared: SharedProjection, index: int):
        super().__init__()
        self.shared = shared
        self.index = index
        self.start = sum(shared.sizes[:index])
        self.in_features, self.out_features = shared.weight.shape[1], shared.sizes[index]

    @property
    def weight(self) -> torch.Tensor:
        return self.shared.weight[self.start : self.start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.shared.bias
        return None if bias is None else bias[self.start : self.start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)


class OneTokenLinear(nn.Linear):
    """An nn.Linear whose one-token products run on the GEMV kernel (the class `fuse` gives them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight, self.bias)


def _fusable(linears) -> bool:
    first = linears[0]
    return all(
        type(linear) is nn.Linear and linear.in_features == first.in_features
        and (linear.bias is None) == (first.bias is None)
        and linear.weight.dtype == first.weight.dtype and linear.weight.device == first.weight.device
        for linear in linears
    )


def _groups(model: nn.Module):
    for module in model.modules():
        for names in FUSED_GROUPS:
            if all(isinstance(getattr(module, name, None), nn.Module) for name in names):
                yield module, names


def fuse(model: nn.Module) -> int:
    """Swap every q/k/v trio of the language model for slices of one shared projection, and its other
    linear layers for `OneTokenLinear`; returns how many trios were fused."""
    fused = 0
    text_model = find_decoder(model).text_model
    for module, names in list(_groups(text_model)):
        linears = [getattr(module, name) for name in names]
        if any(isinstance(linear, ProjectionSlice) for linear in linears) or not _fusable(linears):
            continue
        shared = SharedProjection(linears)
        start = 0
        for index, (name, linear) in enumerate(zip(names, linears)):
            # the original keeps a view of the fused weight: one copy of the bytes, ready for unfuse
            end = start + linear.out_features
            linear.weight = nn.Parameter(shared.weight[start:end], requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(shared.bias[start:end], requires_grad=False)
            start = end
            setattr(module, name, ProjectionSlice(shared, index))
        module._unfused_projections = dict(zip(names, linears))
        fused += 1
    for module in text_model.modules():  # after the trios: their originals stay plain nn.Linear
        if type(module) is nn.Linear:
            module.__class__ = OneTokenLinear
    return fused


def unfuse(model: nn.Module) -> None:
    """Put the original projection modules back (their weights stay views of the fused one)."""
    for module in model.modules():
        if type(module) is OneTokenLinear:
            module.__class__ = nn.Linear
        originals = module.__dict__.pop("_unfused_projections", None)
        for name, linear in (originals or {}).items():
            setattr(module, name, linear)
