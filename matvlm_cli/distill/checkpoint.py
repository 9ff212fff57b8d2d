"""A run's checkpoints in `output.dir/checkpoints/step-NNNNNNN`, and its final hybrid in `output.dir/final`.

A checkpoint holds the trainable weights (safetensors), the optimizer, scheduler and RNG states and the
data position, written whole and keyed by name, so that any process count resumes it exactly. Only
a finite one is written, atomically; the newest `output.keep_checkpoints` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..atomic import atomic_directory
from ..errors import MatvlmError
from ..hybrid.conversion import HYBRID_KEY
from ..hybrid.saving import save_hybrid
from .shared import SharedTeacherStudent

# Whole (unsharded) state, gathered onto the main process's CPU.
WHOLE_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
CHECKPOINT_FILES = ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")


def checkpoints_in(out: Path) -> list[Path]:
    """The checkpoint folders in output.dir, oldest first (an unfinished one included)."""
    return sorted((out / "checkpoints").glob("step-*"))


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor on the CPU; a collective for an FSDP-sharded parameter."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().contiguous()


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the main process (a collective under FSDP). Tied weights share
    one tensor again, as in the model, so `save_pretrained` writes them once."""
    state = get_model_state_dict(model, options=WHOLE_ON_MAIN)
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first_name.setdefault(id(param), name)]
    return state


def floating_tensors(tree, prefix: str = ""):
    """(name, tensor) for every floating-point tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from floating_tensors(value, f"{prefix}[{i}]")


class Checkpointer:
    """Saves and loads the checkpoints of the run writing to `out`, and its final hybrid. `model` is the
    unwrapped model; `optimizer` and `scheduler` are those the accelerator prepared."""

    def __init__(self, out: Path, keep: int):
        self.out, self.keep = out, keep

    def latest(self) -> Path | None:
        done = [c for c in checkpoints_in(self.out) if (c / "state.json").is_file()]
        return done[-1] if done else None

    def resume_dir(self, resume: str | None) -> Path | None:
        """The checkpoint output.resume names: `auto` is the newest finished one here."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest()
        return Path(resume)

    def save(self, acc: Accelerator, model: torch.nn.Module, optimizer, scheduler, optimized: set[str], position: dict,
             nonfinite_advice: str) -> Path:
        """Writes the checkpoint of `position` (step, epoch, batch_in_epoch, stage); every process takes part."""
        step = position["step"]
        acc.wait_for_everyone()
        target = self.out / "checkpoints" / f"step-{step:07d}"
        # Every process takes part: under FSDP each holds only a shard of these.
        weights = {n: whole_tensor(p) for n, p in model.named_parameters() if n in optimized}
        optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer, options=WHOLE_ON_MAIN)
        # Only a checkpoint whose weights and optimizer state are finite is written, so the newest one is
        # always a good one to resume from (an update can turn the weights to inf while its loss was finite).
        tensors = floating_tensors({"weights": weights, "optimizer": optimizer_state})
        bad = next((n for n, t in tensors if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise MatvlmError(
                f"non-finite values in {bad} after step {step}; stopped. Last good checkpoint: "
                f"{self.latest() or 'none'}. {nonfinite_advice}"
            )
        if acc.is_main_process:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_directory(target, overwrite=True) as tmp:
                save_file(weights, tmp / "trainable.safetensors")
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save({"torch": torch.get_rng_state(), "python": random.getstate()[1]}, tmp / "rng.pt")
                (tmp / "state.json").write_text(json.dumps(position))
            for old in checkpoints_in(self.out)[: -self.keep or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def load(self, path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
        """Restores weights, optimizer, scheduler and RNG from `path`; returns its position."""
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        if missing:
            raise MatvlmError(f"output.resume: {path} is not a checkpoint of matvlm distill (no {', '.join(missing)})")
        try:
            weights = load_file(path / "trainable.safetensors")
            optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
            scheduler_state = torch.load(path / "scheduler.pt", weights_only=True)
            rng = torch.load(path / "rng.pt", weights_only=True)
            position = json.loads((path / "state.json").read_text())
        except Exception as err:  # truncated or corrupt: safetensors, zip and JSON each fail their own way
            raise MatvlmError(f"output.resume: {path} is truncated or corrupt ({type(err).__name__}: {err})") from None
        unknown = sorted(set(weights) - {n for n, _ in model.named_parameters()})
        if unknown:
            raise MatvlmError(f"{path}: checkpoint does not match this recipe's model (e.g. {unknown[0]})")
        # Every process read the whole files; under FSDP each keeps its own shard.
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, optimizer.optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
        # Loading first gives every parameter that requires grad a zero state (torch's _init_optim_state); one that
        # had none when the checkpoint was written (a later stage's, not trained yet) must have none again.
        names = {id(p): n for n, p in model.named_parameters()}
        for param in [p for p in optimizer.optimizer.state if names.get(id(p)) not in optimizer_state["state"]]:
            del optimizer.optimizer.state[param]
        scheduler.load_state_dict(scheduler_state)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), None))
        return position

    def save_final(self, acc: Accelerator, model: torch.nn.Module, shared: SharedTeacherStudent, hybrid: dict,
                   teacher_dir: Path) -> Path:
        """The student alone as a hybrid in `out/final`, its config's hybrid block set to `hybrid`."""
        final = self.out / "final"
        with shared.student_only():
            # Under FSDP every process gathers its shards into one whole state dict (on the main process).
            whole = whole_state_dict(model) if acc.distributed_type == DistributedType.FSDP else None
            if acc.is_main_process:
                setattr(model.config, HYBRID_KEY, hybrid)
                save_hybrid(model, final, source=teacher_dir, overwrite=True, state_dict=whole)
        return final
