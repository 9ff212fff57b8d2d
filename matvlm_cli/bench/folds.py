"""What the GEMV kernel can apply around a one-token product, so that it is not a kernel of its own: the
norm before the product, and a tanh GELU after it.

- **The norm before.** A pre-norm decoder layer normalises the residual stream, then projects it. At
  batch 1 that norm is a reduction kernel of its own, 3.1-3.4 us a layer on an H200 for a 2560-wide
  vector (`docs/results/bench/decode-profile-*-h200-pdl.txt`), although every GEMV program loads the
  whole input anyway. So where the kernel computes the product, it takes the raw input and normalises it
  on the way: it sums x and x² as it streams x, scales x by the norm's weight, and corrects the product
  once at the end (`kernels/gemv.py`). The norm module then passes its input through. The residual add
  that inductor had fused into the norm is left a pointwise kernel of its own, which the compiled step's
  pass then folds into the GEMV that computes one of its terms (`bench/residual_fold.py`).
- **The tanh GELU after.** Phi's fc1, and the gate rows of Gemma's gate/up product: the kernel applies it
  to those rows before it writes them, and the activation module passes its input through. For Gemma
  this saves no kernel: inductor had fused that GELU with the multiplication by up.

Both rest on the probe forward (`fusion.probe`): a norm folds only when one product reads its output, and a
GELU only when it reads a projection's output as it is. A hook cannot see other readers of those tensors;
in the families matvlm describes there are none (the logits are compared in tests/test_bench.py and, on the
kernel path, tests/test_triton_kernels.py).

Which norms fold is found by what they compute, not by their class: a module with a 1-D weight and an eps
is checked against a layer norm or an RMS norm, with the weight or 1 + the weight as the scale (Gemma)
and its bias as the shift, on one input (`norm_fold`). Anything else is left as it is.

Everywhere the kernel does not compute the product (prefill chunks, batches, a CPU), the norm runs as it
did. The GELU runs as one `F.gelu(approximate="tanh")`, the same formula computed in float32 and rounded once:
transformers' `NewGELUActivation` (Phi's) is eight elementwise kernels when the prefill runs eagerly, each
reading and writing the whole (tokens x 10240) activation and each rounding to bf16. One kernel takes 24-37 ms
off an 8k prefill (the teacher's: 135.7 against 166.1 ms on an H200, 134.9 against 171.4 on an H100;
`docs/results/bench/prefill-h200-session23.json`). In bf16 the logits therefore differ from the eager
model's by rounding, as the one-token kernel's do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers.activations as hf_activations
from torch import nn

from ..kernels import gemv

# transformers' tanh GELUs (gelu_new, gelu_pytorch_tanh, gelu_fast): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
TANH_GELUS = tuple(
    cls for name in ("NewGELUActivation", "GELUTanh", "FastGELUActivation")
    if (cls := getattr(hf_activations, name, None)) is not None
)


def is_tanh_gelu(module: nn.Module) -> bool:
    return type(module) in TANH_GELUS or (type(module) is nn.GELU and module.approximate == "tanh")


class ActivationAfterProjection(nn.Module):
    """Stands in for a tanh GELU that the projection before it may apply: passes its input through when
    the GEMV kernel applied it (one decoding token on CUDA); otherwise (prefill chunks, a batch, a CPU)
    applies it in one kernel, where the module it replaces may take eight."""

    def __init__(self, activation: nn.Module, projection: nn.Module):
        super().__init__()
        assert is_tanh_gelu(activation)
        self.activation = activation  # kept for `fusion.unfuse`
        self.projection = [projection]  # a list: not registered as a submodule a second time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.projection[0].gelu_applied else F.gelu(x, approximate="tanh")


@dataclass
class NormFold:
    """A norm as the GEMV kernel applies it: y = scale * (x - mean(x)) / sqrt(var(x) + eps) + shift for a
    layer norm (`centered`), y = scale * x / sqrt(mean(x²) + eps) for an RMS norm. Float32, on the norm's device."""

    scale: torch.Tensor
    shift: torch.Tensor | None
    eps: float
    centered: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.scale
        return y if self.shift is None else y + self.shift


def might_be_norm(module: nn.Module) -> bool:
    """A module with a 1-D weight and an eps: the modules `norm_fold` checks."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and _eps(module) is not None


def _eps(module: nn.Module) -> float | None:
    return next((value for name in ("eps", "variance_epsilon", "epsilon") if isinstance(value := getattr(module, name, None), float)), None)


def norm_fold(module: nn.Module) -> NormFold | None:
    """The module as a `NormFold`, when it computes one: checked on an input whose mean and spread differ
    per row, so that a layer norm, an RMS norm and a scale of 1 + weight cannot pass for one another."""
    if not might_be_norm(module) or not module.weight.dtype.is_floating_point:
        return None
    weight, eps = module.weight, _eps(module)
    bias = getattr(module, "bias", None)
    shift = bias.detach().float() if isinstance(bias, torch.Tensor) else None
    if bias is not None and shift is None:
        return None
    width = weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, width, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [4.0]]) + torch.tensor([[1.0], [-2.0], [3.0], [0.5]]))
    x = x.to(weight.device, weight.dtype)
    with torch.no_grad():
        try:
            expected = module(x).float()
        except Exception:  # not a module that takes one tensor: not a norm this can fold
            return None
    if expected.shape != x.shape:
        return None
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    for centered in (True, False):
        for offset in (0.0, 1.0):
            fold = NormFold(weight.detach().float() + offset, shift, eps, centered)
            if ((fold(x) - expected).norm() / expected.norm()).item() < tolerance:
                return fold
    return None


class NormBeforeProjection(nn.Module):
    """Stands in for a norm whose output only the projection after it reads: where the GEMV kernel will
    compute that product, passes the raw input through and tells the projection to normalise it (the
    projection's `raw_input`); elsewhere runs the norm as before."""

    def __init__(self, norm: nn.Module, projection: nn.Module):
        super().__init__()
        self.norm = norm
        self.projection = [projection]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.projection[0]
        projection.raw_input = gemv.takes(x, projection.weight, projection.bias)
        return x if projection.raw_input else self.norm(x)


def attach_norm(projection: nn.Module, fold: NormFold) -> None:
    """Give the projection what the kernel needs to normalise its input: the scale, and for a layer norm the
    product's row sums of weight x scale (the mean's share of each output); a shift becomes a bias of
    weight x shift. Buffers, not parameters: they are derived, and no weight count includes them."""
    # the kernel reads the scale in every program: in the weights' dtype when that holds it exactly (a bf16
    # norm's weight), float32 otherwise (Gemma's 1 + weight)
    scale = fold.scale.to(projection.weight.dtype)
    projection.register_buffer("norm_scale", scale if torch.equal(scale.float(), fold.scale) else fold.scale, persistent=False)
    # a float32 copy of the weight only where a product with it is needed (a layer norm)
    weight = projection.weight.detach().float() if fold.centered or fold.shift is not None else None
    projection.register_buffer("norm_row_sums", weight @ fold.scale if fold.centered else None, persistent=False)
    bias = projection.bias.detach().float() if projection.bias is not None else None
    if fold.shift is not None:
        bias = weight @ fold.shift + (0 if bias is None else bias)
    projection.register_buffer("norm_bias", bias, persistent=False)
    projection.norm_eps = fold.eps


def detach_norm(projection: nn.Module) -> None:
    for name in ("norm_scale", "norm_row_sums", "norm_bias"):
        projection._buffers.pop(name, None)
    for name in ("norm_eps", "raw_input"):
        projection.__dict__.pop(name, None)
