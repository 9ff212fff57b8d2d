"""Shorter Triton autotuning on Hopper for the kernels that training borrows.

mamba_ssm's SSD kernels and fla's causal conv autotune on their first call. For one packed training step
at TinyLLaVA-3.2B's shape that is 17 kernels and 142 configs: the first forward and backward took 95.7 s
(scan) and 24.5 s (conv) on an H200, nearly all of a compiled distillation's warm-up
(docs/results/distill/autotune/probe-h200-hd80-full.json). Most of those configs never win.

On Hopper (sm_90) each of these autotuners keeps only the configs that ranked first or second at some
mixer shape measured on an H200 (`autotune-sm90.json`, written by experiments/gpu/autotune_probe.py), so
the first call still autotunes, over a few configs rather than 6-16. Other GPUs keep every config, and so
does MATVLM_AUTOTUNE=full, for a shape far from the measured ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

SHORTLISTS = Path(__file__).with_name("autotune-sm90.json")
# The modules whose autotuners the shortlists cover (mamba_ssm's SSD, fla's causal conv).
MODULE_PREFIXES = ("mamba_ssm.ops.triton.ssd", "fla.modules.causal_conv1d")


def autotuners_in(module) -> list[tuple[str, object]]:
    """(name, autotuner) for each Triton autotuner a module defines, also under @triton.heuristics."""
    from triton.runtime.autotuner import Autotuner

    found = []
    for name, obj in vars(module).items():
        for _ in range(3):  # heuristics wrap the autotuner: follow `.fn`
            if isinstance(obj, Autotuner):
                found.append((name, obj))
                break
            obj = getattr(obj, "fn", None)
    return found


def wanted(device: torch.device | None = None) -> bool:
    """Whether the shortlists apply: a Hopper GPU, and MATVLM_AUTOTUNE not `full`."""
    if os.environ.get("MATVLM_AUTOTUNE", "shortlist") == "full" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def shorten() -> dict[str, int]:
    """Cut every loaded autotuner of `MODULE_PREFIXES` down to its shortlist, where one applies.
    Configs are matched by Triton's own description of them (`str(config)`); a kernel whose
    shortlist matches none of its configs (another Triton's wording, another version of the
    kernels) keeps them all. Returns {kernel: configs kept} for the kernels cut."""
    if not wanted():
        return {}
    lists = json.loads(SHORTLISTS.read_text())["kernels"]
    kept = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(MODULE_PREFIXES):
            continue
        for kernel, tuner in autotuners_in(module):
            shortlist = set(lists.get(kernel, ()))
            configs = [c for c in tuner.configs if str(c) in shortlist]
            if configs and len(configs) < len(tuner.configs):
                tuner.configs = configs
                kept[kernel] = len(configs)
    return kept
