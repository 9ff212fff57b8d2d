"""The `graphs` engine's projections: one GEMV for every group of projections that read the same input,
and every one-token product on a GEMV kernel.

At batch 1 a decode step is a string of matrix-vector products, and a small one cannot reach the
card's bandwidth: a 13 MB projection of Phi-2 takes 8.3 us on an H100, where its bytes take 4.5 us,
and q, k and v read as one 39 MB matrix take 16.5 us instead of 25 (`docs/bench.md`). So, as inference
engines do, the `graphs` engine concatenates the weights of projections that read the same tensor and
computes them in one product: q, k and v; a gated MLP's gate and up projections (Llama, Qwen2); and in a
parallel block (Phi), q, k, v and the MLP's fc1 together, or a Mamba layer's in_proj and fc1. Which
projections read the same tensor is found by one two-token forward of the language model with a hook
on each linear layer (`probe`), so no family's module names are known here.

The same forward finds each tanh GELU that takes a projection's output as it is (Phi's fc1, Gemma's gate
projection), and each norm whose output only one product reads (the pre-norms). When the GEMV kernel
computes the product (one decoding token on CUDA) it applies them itself, and their modules pass their
input through (`bench/folds.py`): for Phi one GELU kernel less per layer, for every pre-norm family one
norm kernel less per pre-norm.

It changes no model code. The projection modules are swapped for slices of one shared projection,
which computes all of them when the first is called and hands out the others from memory. The
original modules keep views of the fused weight, so the weights are held once, and `unfuse` puts them
back (the `hf` engine runs the model as users do).

The same swap sends every other linear layer of the language model (the attention's output, the MLP's
last projection, a Mamba layer's out_proj) through `kernels/gemv.py` while they are fused: for one token
on CUDA that is a Triton GEMV that reads the weights nearer the card's bandwidth than cuBLAS does; for a
prefill chunk, a batch or a CPU it is `F.linear` as before. The modules change class, not weights.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..hybrid.conversion import find_decoder
from ..kernels import gemv
from .folds import (
    ActivationAfterProjection,
    NormBeforeProjection,
    attach_norm,
    detach_norm,
    is_tanh_gelu,
    might_be_norm,
    norm_fold,
)


class _Pending:
    """The shared projection's last input and outputs, until every slice has taken its part."""

    def __init__(self):
        self.input = self.outputs = None
        self.left = 0


class SharedProjection(nn.Module):
    def __init__(self, linears: list[nn.Linear], gelu_rows: tuple[int, int] = (0, 0)):
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])
        self.weight = nn.Parameter(weight, requires_grad=False)
        # a projection without a bias beside ones with (a Mamba in_proj beside Phi's fc1) adds zeros
        biases = [linear.bias.detach() if linear.bias is not None else weight.new_zeros(linear.out_features) for linear in linears]
        has_bias = any(linear.bias is not None for linear in linears)
        self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) if has_bias else None
        self.sizes = [linear.out_features for linear in linears]
        self.gelu_rows = gelu_rows
        self.gelu_applied = False
        self.raw_input = False  # set by the norm before (bench/folds.py) when it passed its input through
        self.pending = _Pending()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pending = self.pending
        if pending.left == 0 or pending.input is not x:
            out = _product(self, x)
            pending.input, pending.outputs = x, out.split(self.sizes, dim=-1)
            pending.left = len(self.sizes)
        out = pending.outputs[index]
        pending.left -= 1
        if pending.left == 0:  # let go of the activations
            pending.input = pending.outputs = None
        return out


class ProjectionSlice(nn.Module):
    """Stands in for one of the fused projections, and reads like it (weight, bias, sizes)."""

    def __init__(self, shared: SharedProjection, index: int, has_bias: bool):
        super().__init__()
        self.shared = shared
        self.index = index
        self.has_bias = has_bias
        self.start = sum(shared.sizes[:index])
        self.in_features, self.out_features = shared.weight.shape[1], shared.sizes[index]

    @property
    def weight(self) -> torch.Tensor:
        return self.shared.weight[self.start : self.start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return self.shared.bias[self.start : self.start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)


class OneTokenLinear(nn.Linear):
    """An nn.Linear whose one-token products run on the GEMV kernel (the class `fuse` gives them), with
    the GELU after it applied there when `fuse` set `gelu_rows`, and the norm before it when `fuse`
    attached one (bench/folds.py)."""

    gelu_rows = (0, 0)
    gelu_applied = False
    raw_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _product(self, x)


def _product(projection: SharedProjection | OneTokenLinear, x: torch.Tensor) -> torch.Tensor:
    """The projection's product. Where the GEMV kernel computes it, the kernel also applies the GELU rows
    and, when the norm before passed its raw input through, that norm (bench/folds.py); records whether
    it applied the GELU, for the activation module after it."""
    normed = projection.raw_input
    projection.raw_input = False
    applied = projection.gelu_rows != (0, 0) and gemv.takes(x, projection.weight, projection.bias)
    projection.gelu_applied = applied
    if normed:  # the norm asked `gemv.takes` of the same input: the kernel computes this product
        return gemv.gemv(x, projection.weight, projection.norm_bias, *projection.gelu_rows, projection.norm_scale,
                         projection.norm_row_sums, projection.norm_eps)
    if applied:
        return gemv.gemv(x, projection.weight, projection.bias, *projection.gelu_rows)
    return gemv.linear(x, projection.weight, projection.bias)


@dataclass
class ProbeResult:
    """What one forward of the language model showed: the linear layers that read the same tensor
    (groups of two or more, in call order), the tanh GELU that takes each one's output as it is, and the
    norm-like module whose output each one reads as it is (every member of a group maps to it)."""

    shared_inputs: list[list[nn.Linear]] = field(default_factory=list)
    gelu_after: dict[nn.Linear, nn.Module] = field(default_factory=dict)
    norm_before: dict[nn.Linear, nn.Module] = field(default_factory=dict)


def probe(text_model: nn.Module) -> ProbeResult:
    """One two-token forward with a hook on each linear layer, each tanh GELU and each module that may be a
    norm (`might_be_norm`). A module called more than once in that forward (a shared one) is left alone:
    its inputs differ from call to call."""
    linears = [module for module in text_model.modules() if type(module) is nn.Linear]
    gelus = [module for module in text_model.modules() if is_tanh_gelu(module)]
    norms = [module for module in text_model.modules() if might_be_norm(module)]
    # the tensors are kept until the end, so `is` compares live tensors
    reads: list[tuple[nn.Linear, torch.Tensor]] = []
    writes: list[tuple[nn.Linear, torch.Tensor]] = []
    gelu_reads: list[tuple[nn.Module, torch.Tensor]] = []
    norm_writes: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [linear.register_forward_pre_hook(lambda module, args: reads.append((module, args[0]))) for linear in linears]
    handles += [linear.register_forward_hook(lambda module, args, out: writes.append((module, out))) for linear in linears]
    handles += [gelu.register_forward_pre_hook(lambda module, args: gelu_reads.append((module, args[0]))) for gelu in gelus]
    handles += [norm.register_forward_hook(lambda module, args, out: norm_writes.append((module, out))) for norm in norms]
    embeddings = text_model.get_input_embeddings().weight
    tokens = torch.zeros(1, 2, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    try:
        with torch.no_grad():
            text_model(inputs_embeds=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    calls = Counter(module for module, _ in reads + gelu_reads + norm_writes)
    result = ProbeResult()
    groups: list[tuple[torch.Tensor, list[nn.Linear]]] = []
    for module, x in reads:
        if calls[module] != 1:
            continue
        group = next((members for seen, members in groups if seen is x), None)
        if group is None:
            groups.append((x, [module]))
        else:
            group.append(module)
    result.shared_inputs = [members for _, members in groups if len(members) > 1 and _fusable(members)]
    # A hook cannot see whether anything besides the GELU reads the projection's raw output; in the MLPs of
    # the families matvlm describes nothing does (tests/test_bench.py compares the logits).
    for gelu, x in gelu_reads:
        writer = next((linear for linear, out in writes if out is x), None)
        if writer is not None and calls[gelu] == 1 and calls[writer] == 1:
            result.gelu_after[writer] = gelu
    # Nor can it see whether anything besides the projections reads a norm's output; in the pre-norm layers
    # of the families matvlm describes nothing does (tests/test_bench.py, tests/test_triton_kernels.py).
    # A norm folds into one product only: its readers must be one group above, or one linear layer.
    for norm, out in norm_writes:
        readers = [module for module, x in reads if x is out]
        if calls[norm] == 1 and all(calls[module] == 1 for module in readers) and (
            len(readers) == 1 or readers in result.shared_inputs
        ):
            result.norm_before.update(dict.fromkeys(readers, norm))
    return result


def _fusable(linears) -> bool:
    first = linears[0]
    return all(
        linear.in_features == first.in_features
        and linear.weight.dtype == first.weight.dtype and linear.weight.device == first.weight.device
        for linear in linears
    )


def fuse(model: nn.Module) -> int:
    """Swap each group of the language model's projections that read the same input for slices of one
    shared projection, and its other linear layers for `OneTokenLinear`; a tanh GELU right after a
    projection moves into it. Returns how many shared projections were made (0 when the model is fused
    already)."""
    text_model = find_decoder(model).text_model
    if any(isinstance(module, (SharedProjection, OneTokenLinear)) for module in text_model.modules()):
        return 0
    place = {module: (parent, name) for parent in text_model.modules() for name, module in parent.named_children()}
    found = probe(text_model)

    def swap(module: nn.Module, replacement: nn.Module) -> None:
        parent, name = place[module]
        setattr(parent, name, replacement)
        parent.__dict__.setdefault("_unfused", {})[name] = module

    def take_gelu(linear: nn.Linear, projection: SharedProjection | OneTokenLinear) -> None:
        gelu = found.gelu_after[linear]
        swap(gelu, ActivationAfterProjection(gelu, projection))

    def take_norm(linear: nn.Linear, projection: SharedProjection | OneTokenLinear) -> None:
        norm = found.norm_before.get(linear)
        fold = norm_fold(norm) if norm is not None else None
        if fold is not None:
            attach_norm(projection, fold)
            swap(norm, NormBeforeProjection(norm, projection))

    for linears in found.shared_inputs:
        starts = [sum(linear.out_features for linear in linears[:i]) for i in range(len(linears))]
        # one range of rows per product: the first member with a GELU after it
        with_gelu = next((i for i, linear in enumerate(linears) if linear in found.gelu_after), None)
        gelu_rows = (0, 0)
        if with_gelu is not None:
            gelu_rows = (starts[with_gelu], starts[with_gelu] + linears[with_gelu].out_features)
        shared = SharedProjection(linears, gelu_rows)
        if with_gelu is not None:
            take_gelu(linears[with_gelu], shared)
        take_norm(linears[0], shared)
        for index, (linear, start) in enumerate(zip(linears, starts)):
            # the original keeps a view of the fused weight: one copy of the bytes, ready for unfuse
            end = start + linear.out_features
            linear.weight = nn.Parameter(shared.weight[start:end], requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(shared.bias[start:end], requires_grad=False)
            swap(linear, ProjectionSlice(shared, index, linear.bias is not None))
    for module in list(text_model.modules()):  # after the groups: their originals stay plain nn.Linear
        if type(module) is nn.Linear:
            module.__class__ = OneTokenLinear
            if module in found.gelu_after:
                module.gelu_rows = (0, module.out_features)
                take_gelu(module, module)
            take_norm(module, module)
    return len(found.shared_inputs)


def unfuse(model: nn.Module) -> None:
    """Put the original projection and activation modules back (the weights stay views of the fused one)."""
    for module in model.modules():
        if type(module) is OneTokenLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("gelu_rows", None)
            module.__dict__.pop("gelu_applied", None)
            detach_norm(module)
        originals = module.__dict__.pop("_unfused", None)
        for name, original in (originals or {}).items():
            setattr(module, name, original)
