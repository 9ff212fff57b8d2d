"""Optional CUDA kernels for the Mamba-2 mixer, imported lazily and only on demand.

mamba-ssm and causal-conv1d ship as sdists that compile CUDA code; a CPU machine can never import
them. Nothing here imports them at module load: `available()` tries once, and every caller has a
pure-PyTorch path beside it (see `ssd.py`).
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch

BACKENDS = ("auto", "torch", "mamba-ssm")
_selected = "auto"


def set_backend(name: str) -> None:
    """Choose the kernels for the mixer: `auto` (fastest available), `torch` or `mamba-ssm`."""
    global _selected
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "mamba-ssm" and mamba_ssm_ops() is None:
        raise ValueError("backend 'mamba-ssm' requested but mamba_ssm/causal_conv1d do not import")
    _selected = name


def get_backend() -> str:
    return _selected


@functools.cache
def mamba_ssm_ops() -> SimpleNamespace | None:
    """The mamba_ssm / causal_conv1d entry points, or None when they are not importable."""
    try:
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        state = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        conv = importlib.import_module("causal_conv1d")
    except Exception:  # ImportError, or a compiled extension built for another torch
        return None
    return SimpleNamespace(
        chunk_scan=ssd.mamba_chunk_scan_combined,
        state_update=state.selective_state_update,
        conv1d=conv.causal_conv1d_fn,
        conv1d_update=conv.causal_conv1d_update,
    )


def kernels_for(tensor: torch.Tensor) -> SimpleNamespace | None:
    """Kernels to use for this tensor, or None for the PyTorch reference path."""
    if _selected == "torch" or not tensor.is_cuda:
        return None
    return mamba_ssm_ops()
