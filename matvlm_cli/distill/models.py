"""The run's models and what trains them: the teacher and the student as one `SharedTeacherStudent`,
the AdamW parameter groups, and the FSDP2 units."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MatvlmError
from ..hybrid.conversion import (
    HYBRID_KEY,
    attention_windows,
    choose_layers,
    convert_to_hybrid,
    find_decoder,
    hybrid_layers,
)
from ..hybrid.load import load_hybrid, load_teacher
from ..recipes import DistillRecipe
from .shared import SharedTeacherStudent
from .stages import StagePlan

# The frozen weights are held in the autocast dtype (half the memory, no cast at every use); trainable ones
# stay fp32 master weights. Under FSDP everything stays fp32: FSDP2 wants one dtype per unit and casts
# each unit to bf16 itself when it gathers it.
FROZEN_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_models(recipe: DistillRecipe, teacher_dir: Path) -> tuple[SharedTeacherStudent, dict]:
    """The student with the teacher's attention beside each Mamba-2 mixer; one copy of the rest. Also
    returns the student's hybrid config block."""
    frozen = torch.float32 if recipe.training.distributed == "fsdp" else FROZEN_DTYPE[recipe.training.precision]
    kwargs = {"trust_remote_code": recipe.trust_remote_code, "dtype": frozen}
    if recipe.student.path:
        student = load_hybrid(recipe.student.path, **kwargs)
        teacher = load_teacher(teacher_dir, **kwargs)
        if len(find_decoder(student).layers) != len(find_decoder(teacher).layers):
            raise MatvlmError("student.path: its decoder does not have the teacher's number of layers")
        layers = hybrid_layers(student)
        attentions = {i: find_decoder(teacher).attention(i) for i in layers}
    else:
        # The teacher's attention modules are kept aside before conversion replaces them: no copy.
        student = load_teacher(teacher_dir, **kwargs)
        layout = find_decoder(student)
        # A stepwise run converts the last stage's layers (every stage's) up front; see SharedTeacherStudent.
        explicit = recipe.stages[-1].layers if recipe.stages else recipe.student.layers
        layers = choose_layers(len(layout.layers), recipe.student.ratio, recipe.student.placement, explicit,
                               attention_windows(student.config.get_text_config(decoder=True)))
        attentions = {i: layout.attention(i) for i in layers}
        convert_to_hybrid(student, layers, seed=recipe.student.seed, source=str(teacher_dir),
                          ratio=len(layers) / len(layout.layers),
                          placement=None if explicit else recipe.student.placement)
    block = dict(getattr(student.config, HYBRID_KEY)) | {"distilled_from": str(teacher_dir)}
    plan = StagePlan(recipe, layers, 0)
    stages = [(stage.layers, plan.trainable(i)) for i, stage in enumerate(plan.stages)]
    trainables = tuple(trainable for _, trainable in stages)
    separate = load_teacher(teacher_dir, **kwargs) if "all" in trainables else None
    shared = SharedTeacherStudent(student, attentions, trainables[0], separate, trainables[1:])
    if len(stages) > 1:
        shared.set_stage(*stages[0])
    # Every parameter some stage trains: the optimizer holds them (and checkpoints save them) from the start.
    shared.optimized = shared.trainable_in_any(stages)
    for name, param in student.named_parameters():
        if name in shared.optimized:
            param.data = param.data.float()
    return shared, block


def param_groups(model: torch.nn.Module, weight_decay: float, keep: set[str] | None = None) -> list[dict]:
    """AdamW groups: no weight decay on 1-D parameters (A_log, D, dt_bias, norms, biases). `keep`: names of
    the parameters to optimise (default: those that require grad)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if (name in keep) if keep is not None else param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fsdp_plugin():
    """FSDP2 (per-parameter sharding): frozen and trainable weights may share a unit, and a unit may be
    called on its own outside the model's forward, as the layer loss does."""
    from accelerate import FullyShardedDataParallelPlugin

    # No state_dict_type: checkpoints and the final hybrid gather whole state themselves (checkpoint.py).
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")


def fsdp_units(model: torch.nn.Module, decoder_layer: torch.nn.Module) -> list[str]:
    """Class names that become FSDP units: the decoder's layers, plus the model's own no-split blocks
    (e.g. the vision tower's layers) where it names them."""
    present = {type(m).__name__ for m in model.modules()}
    named = [name for name in getattr(model, "_no_split_modules", None) or [] if name in present]
    return sorted(set(named) | {type(decoder_layer).__name__})
