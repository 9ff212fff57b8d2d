"""Every GPU kernel matvlm has or borrows, and the choice between them.

matvlm's own Triton kernels live in this package: `step.py` (a whole Mamba-2 decode step), `norm.py`
(the skip, gate and norm after a prefill's chunk scan), and for bench's `graphs` engine `attention.py`
(split-KV decoding attention) and `gemv.py` (one-token projections). The decode kernels launch with
programmatic dependent launch on Hopper and later (`pdl` below). This module picks the mixer's kernels,
imported lazily and only on demand.

Three backends compute the same four operations (chunked scan, one-token state update, causal conv,
one-token conv update):

- `torch`: the PyTorch reference in `hybrid/ssd.py`; runs anywhere.
- `mamba-ssm`: mamba_ssm's Triton SSD kernels and causal_conv1d's CUDA conv. Both ship as sdists that
  compile CUDA code, so a CPU machine can never import them.
- `fla`: fla-core's Triton kernels (`chunk_simple_gla` with q=C, k=B, v=x*dt, g=A*dt, and its
  causal conv). Pure Python plus Triton: it installs in seconds and compiles nothing ahead of time.
  It has no fused one-token update, so decoding steps use the PyTorch step (a handful of tiny ops).
  On Hopper with Triton 3.4 - 3.7.0 fla refuses its gated backward; training then passes it over.

Nothing is imported at module load. `auto` takes, op by op, the fastest backend that imports,
in the order measured on an H100/H200 (docs/bench.md, `matvlm bench --kernels`). On Hopper the borrowed
Triton kernels autotune over short lists of configs (`shortlists.py`): a compiled run's warm-up was
mostly their autotuning.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import SimpleNamespace
from typing import Callable

import torch

from ..choices import Backend, choices
from . import shortlists

BACKENDS = choices(Backend)
# mixer_step is a whole decode step fused into one kernel (`step.py`); where no backend has it,
# the step runs as conv1d_update + state_update + the gated norm. skip_gate_norm is what follows a prefill's
# chunk scan (the skip term, the gate and the grouped norm) in one kernel (`norm.py`).
OPS = ("chunk_scan", "state_update", "conv1d", "conv1d_update", "mixer_step", "skip_gate_norm")
FORWARD_ONLY = ("mixer_step", "skip_gate_norm")  # no backward: passed over where gradients are needed
# Fastest first, per op (measured on an H100: fla's chunk scan 0.40 ms vs mamba_ssm's 0.57 ms; causal_conv1d's CUDA
# conv 0.10 ms; the fused state update beats the few PyTorch ops of a step).
AUTO_ORDER = {
    "chunk_scan": ("fla", "mamba-ssm"),
    "state_update": ("mamba-ssm",),
    "conv1d": ("mamba-ssm", "fla"),
    "conv1d_update": ("mamba-ssm",),
    "mixer_step": ("triton",),
    "skip_gate_norm": ("triton",),
}
_selected = "auto"


# A device without streaming multiprocessors is Triton's interpreter on the CPU (TRITON_INTERPRET=1, the
# suite's kernel tests): it is given an H200's count, so it runs the grids an H200 runs.
H200_SMS = 132


@functools.cache
def sm_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors: how the Triton decode kernels size their grids."""
    if device.type != "cuda":
        return H200_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def pdl(device: torch.device) -> bool:
    """Whether the Triton decode kernels launch with programmatic dependent launch (PDL). From Hopper on,
    a kernel so launched is scheduled while the one before it is still finishing; each waits
    (`gdc_wait`) before it reads anything, and lets the next one start (`gdc_launch_dependents`) once its
    main loop is done. A decode step is a few hundred short kernels, so the gaps between them count.
    MATVLM_PDL=0 launches them plainly, to time the difference."""
    if device.type != "cuda" or os.environ.get("MATVLM_PDL", "1") == "0" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        import triton.language.extra.cuda as cuda_extra
    except ImportError:
        return False
    return hasattr(cuda_extra, "gdc_wait") and hasattr(cuda_extra, "gdc_launch_dependents")


def set_backend(name: str) -> None:
    """Choose the mixer's kernels: `auto` (fastest available per op), `torch`, `mamba-ssm` or `fla`."""
    global _selected
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto" and name != "torch" and backend_ops(name) is None:
        raise ValueError(f"backend {name!r} requested but it does not import here ({INSTALL_HINT[name]})")
    _selected = name


def get_backend() -> str:
    return _selected


INSTALL_HINT = {
    "triton": "Triton comes with CUDA builds of torch",
    "mamba-ssm": "pip install 'matvlm[cuda]' on a CUDA machine with nvcc",
    "fla": "pip install fla-core",
}


# A plain dict, not functools.cache: torch.compile reads a dict lookup as a constant, but through a
# cached function it traces into the loader, whose import breaks the graph (40 graphs per decode step
# of a 0.25 TinyLLaVA hybrid instead of one; docs/results/bench/graph-count-h100.txt).
_loaded: dict[str, SimpleNamespace | None] = {}


def backend_ops(name: str) -> SimpleNamespace | None:
    """The ops a kernel backend provides (None for those it lacks), or None when it does not import."""
    if name not in _loaded:
        _loaded[name] = _load(name)
    return _loaded[name]


def _load(name: str) -> SimpleNamespace | None:
    try:
        return _LOADERS[name]()
    except Exception:  # ImportError, or a compiled extension built for another torch
        return None


def _import_mamba_ssm_triton(name: str):
    """A module of mamba_ssm's Triton kernels. Its package `__init__` imports the compiled selective-scan
    extension (Mamba-1), which the Mamba-2 Triton kernels never call; where that extension was not built
    (it takes minutes of nvcc), the package is registered without running its `__init__`."""
    import sys

    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations or "mamba_ssm" in sys.modules:
            raise
        sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)
        return importlib.import_module(name)


def _load_mamba_ssm() -> SimpleNamespace:
    ssd = _import_mamba_ssm_triton("mamba_ssm.ops.triton.ssd_combined")
    state = _import_mamba_ssm_triton("mamba_ssm.ops.triton.selective_state_update")
    try:
        conv = importlib.import_module("causal_conv1d")
    except ImportError:  # a CUDA package of its own: without it the conv comes from the next backend
        conv = None
    shortlists.shorten()

    def conv1d(x, weight, bias, activation, seq_idx=None, cu_seqlens=None):
        # channels-first or channels-last strides both work without seq_idx, which needs channels-last
        if not (x.stride(1) == 1 or (seq_idx is None and x.stride(2) == 1)):
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return conv.causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation)

    return SimpleNamespace(
        chunk_scan=ssd.mamba_chunk_scan_combined,
        state_update=state.selective_state_update,
        conv1d=conv1d if conv else None,
        conv1d_update=conv.causal_conv1d_update if conv else None,
        mixer_step=None,
        skip_gate_norm=None,
        chunk_scan_trains=True,
        packs={"chunk_scan", "conv1d"},  # both take seq_idx
    )


def _load_fla() -> SimpleNamespace:
    gla = importlib.import_module("fla.ops.simple_gla")
    conv = importlib.import_module("fla.modules.causal_conv1d")
    env = importlib.import_module("fla.utils")
    shortlists.shorten()
    # fla refuses the gated backward on Hopper with Triton 3.4 - 3.7.0 (wrong results upstream, fla #640).
    broken_backward = (
        getattr(env, "IS_NVIDIA_HOPPER", False) and getattr(env, "TRITON_ABOVE_3_4_0", False)
        and not getattr(env, "TRITON_ABOVE_3_7_1", True)
    )

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=True):
        # Mamba-2's SSD is simple GLA with q=C, k=B, v=x*dt and per-step log decay g=A*dt; the state
        # layout (heads, headdim, d_state) is fla's "V first".
        heads = x.shape[2]
        k = B if B.shape[2] == heads else B.repeat_interleave(heads // B.shape[2], dim=2)
        q = C if C.shape[2] == heads else C.repeat_interleave(heads // C.shape[2], dim=2)
        v = x * dt.unsqueeze(-1).to(x.dtype)
        y, final = gla.chunk_simple_gla(
            q, k, v, g=(dt * A).float(), scale=1.0, initial_state=initial_states,
            output_final_state=True, state_v_first=True,
        )
        if D is not None:
            y = y + x * D[:, None].to(x.dtype)
        return y.to(x.dtype), final

    def conv1d(x, weight, bias, activation="silu", seq_idx=None, cu_seqlens=None):
        if seq_idx is None:
            # fla's kernel reads x (batch, length, channels) through its strides, and loads a tile of channels
            # at each step: channels must be adjacent in memory. A prefill chunk after the first arrives
            # channels-first (the cached window concatenated in front of it), where adjacent channels lie a
            # whole sequence apart; one copy into channels-last costs less than the scattered loads.
            y, _ = conv.causal_conv1d(x.transpose(1, 2).contiguous(), weight, bias, activation=activation)
            return y.transpose(1, 2)
        # Packed records: fla takes their boundaries over one flattened row.
        batch, channels, length = x.shape
        flat = x.transpose(1, 2).reshape(1, batch * length, channels)
        y, _ = conv.causal_conv1d(flat, weight, bias, activation=activation, cu_seqlens=cu_seqlens)
        return y.reshape(batch, length, channels).transpose(1, 2)

    return SimpleNamespace(
        chunk_scan=chunk_scan, state_update=None, conv1d=conv1d, conv1d_update=None, mixer_step=None,
        skip_gate_norm=None, chunk_scan_trains=not broken_backward,
        packs={"conv1d"},  # its chunk scan would need the rows flattened too; packed scans go to mamba-ssm
    )


def _load_triton() -> SimpleNamespace:
    """matvlm's own Triton kernels: the fused decode step and the prefill's skip, gate and norm (the other
    ops stay PyTorch's)."""
    importlib.import_module("triton")
    from .norm import skip_gate_norm
    from .step import fused_step

    return SimpleNamespace(
        chunk_scan=None, state_update=None, conv1d=None, conv1d_update=None, mixer_step=fused_step,
        skip_gate_norm=skip_gate_norm, chunk_scan_trains=True, packs=set(),
    )


_LOADERS = {"triton": _load_triton, "mamba-ssm": _load_mamba_ssm, "fla": _load_fla}


def kernel(op: str, tensor: torch.Tensor, needs_grad: bool = False, packed: bool = False) -> Callable | None:
    """The kernel for `op` on this tensor under the selected backend, or None for the PyTorch path.
    With `needs_grad`, a chunk scan whose backward cannot run here, and forward-only kernels, are passed over;
    with `packed`, a kernel that cannot keep packed records apart (seq_idx) is."""
    if _selected == "torch" or not tensor.is_cuda or (needs_grad and op in FORWARD_ONLY):
        return None
    candidates = AUTO_ORDER[op] if _selected == "auto" else (_selected,)
    for name in candidates:
        ops = backend_ops(name)
        if ops is None or getattr(ops, op) is None:
            continue
        if needs_grad and op == "chunk_scan" and not ops.chunk_scan_trains:
            continue
        if packed and op not in ops.packs:
            continue
        return getattr(ops, op)
    return None


def trains(name: str) -> bool:
    """Whether a backend's chunk scan can run backward on this machine."""
    ops = backend_ops(name)
    return name == "torch" or (ops is not None and ops.chunk_scan_trains)


def resolved() -> dict[str, str]:
    """Which backend each op runs on for CUDA tensors right now, e.g. {'chunk_scan': 'fla', ...}."""
    if _selected == "torch" or not torch.cuda.is_available():
        return dict.fromkeys(OPS, "torch")
    candidates = {op: AUTO_ORDER[op] if _selected == "auto" else (_selected,) for op in OPS}
    return {
        op: next((n for n in names if (ops := backend_ops(n)) is not None and getattr(ops, op) is not None), "torch")
        for op, names in candidates.items()
    }


def available() -> list[str]:
    """Backends usable on this machine (torch always; the others need CUDA and an import)."""
    gpu = torch.cuda.is_available()
    return ["torch"] + [name for name in _LOADERS if gpu and backend_ops(name) is not None]
