"""The compiled decode step's residual adds, folded into the GEMV that computes one of their terms.

With the pre-norms inside the GEMV (`bench/folds.py`), what is left between one layer's products and the
next is the residual add: hidden + attention output and hidden + MLP output (in Phi's parallel block,
hidden + attention + MLP in one expression). Inductor cannot fuse an add into the GEMV, an opaque custom op,
so each was a pointwise kernel of its own: 30 a step of 2.4 us each in the H200 profile of the teacher at 8k
(docs/results/bench/decode-profile-teacher-8192-h200-fc2.txt).

`ResidualFold` is an inductor post-grad pass that rewrites `add(gemv(...), t)` as `gemv(..., residual=t)`,
which adds t before its one store. It reads the traced graph, so it knows no family: it folds any add of a
GEMV's output that nothing else reads and a contiguous tensor of the same shape and dtype. A sum of two GEMVs
and a third tensor (Phi) becomes a chain: the inner GEMV adds the third tensor, the outer the inner's result.
The sum is rounded once instead of twice, so it may differ from the unfused step's in the last bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._prims_common import is_contiguous_or_false
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from ..kernels import gemv  # registers matvlm::gemv

GEMV = torch.ops.matvlm.gemv.default
ADD = torch.ops.aten.add.Tensor
RESIDUAL_POSITION = [argument.name for argument in GEMV._schema.arguments].index("residual")


def _same_layout(product: Node, term) -> bool:
    """Whether the kernel can add `term` row for row: a contiguous tensor of the product's shape and dtype, as
    far as the trace's symbolic sizes tell without a new guard."""
    if not isinstance(term, Node):
        return False
    out, other = product.meta.get("val"), term.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(other, torch.Tensor) or out.dtype != other.dtype:
        return False
    return statically_known_true(sym_eq(out.shape, other.shape)) and is_contiguous_or_false(other)


def _with_residual(graph: Graph, product, term, before: Node) -> Node | None:
    """A new GEMV node, inserted before `before`, computing `product + term`; None where it cannot. A product
    that already adds a GEMV's output passes `term` on to that GEMV (a chain)."""
    if not isinstance(product, Node) or product.target is not GEMV or len(product.users) != 1:
        return None
    if len(product.args) > RESIDUAL_POSITION:  # a residual given by position: no caller passes one
        return None
    if not _same_layout(product, term):
        return None
    inner = product.kwargs.get("residual")
    if inner is not None:
        inner = _with_residual(graph, inner, term, before)
        if inner is None:
            return None
        term = inner
    with graph.inserting_before(before):  # as traced, plus the keyword (inductor keeps the traced arity)
        new = graph.call_function(GEMV, product.args, {**product.kwargs, "residual": term})
    new.meta = dict(product.meta)
    return new


def fold_residual_adds(graph: Graph) -> int:
    """Rewrite every foldable add in `graph` (in place); returns how many were folded."""
    folded = 0
    for add in list(graph.nodes):
        if add.op != "call_function" or add.target is not ADD or add.kwargs or len(add.args) != 2:
            continue
        left, right = add.args
        new = _with_residual(graph, left, right, add) or _with_residual(graph, right, left, add)
        if new is None:
            continue
        add.replace_all_uses_with(new)
        graph.erase_node(add)
        folded += 1
    dead = [node for node in graph.nodes if node.target is GEMV and not node.users]
    while dead:  # the replaced GEMVs, outer ones first
        for node in dead:
            graph.erase_node(node)
        dead = [node for node in graph.nodes if node.target is GEMV and not node.users]
    return folded


class ResidualFold(CustomGraphPass):
    """`fold_residual_adds` as inductor's `post_grad_custom_post_pass`. `folded`: the adds folded in each
    graph it compiled (a graph from inductor's cache is not compiled again)."""

    def __init__(self):
        self.folded: list[int] = []

    def __call__(self, graph: Graph) -> None:
        self.folded.append(fold_residual_adds(graph))

    def uuid(self) -> bytes:
        """Inductor's and AOTAutograd's cache key for every step compiled with this pass: this file and the
        kernels package. torch keys a cached graph by its FX code, and takes any custom op in it as cacheable
        without hashing the op's fake implementation, so a step compiled before an op's output changed would
        be loaded again after it (seen in session 23: a hybrid's step compiled when the Mamba-2 step returned
        float32, loaded after it returned bfloat16, read the bf16 output as float32)."""
        return get_hash_for_files(cache_key_files())


def cache_key_files() -> tuple[str, ...]:
    """This file and every module of `matvlm_cli.kernels`, where the compiled step's custom ops and their
    fake implementations are defined."""
    return (__file__, *sorted(str(path) for path in Path(gemv.__file__).parent.glob("*.py")))
