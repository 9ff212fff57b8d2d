"""One model that is both teacher and student.

Frozen parts (vision tower, embeddings, norms, MLPs, unconverted layers) exist once. Each converted
layer holds a `TeacherStudentMixer`: the teacher's attention and the student's Mamba-2 mixer side
by side, and `teacher_path()` switches every one of them for the teacher's forward pass. MaTVLM's
code keeps two full models instead, which doubles the weight memory.

When the connector is trained (`mamba+connector`) a frozen copy of it serves the teacher path, so
the teacher stays the teacher; when the whole converted layers are trained (`converted`: mixer, norms
and MLP) frozen copies of those layers serve it; when everything is trained (`all`) the teacher is a
separate copy.

Stepwise distillation converts every layer of the run up front; `set_stage` says which of them the
student runs as Mamba-2 so far (the others still run the teacher's attention) and what is trained.
The teacher's attention is frozen, so a layer converted up front starts from exactly the weights
it would get from the teacher at its stage's start.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from torch import nn

from ..choices import Trainable, choices
from ..hybrid.conversion import find_decoder
from ..hybrid.mamba2 import Mamba2Mixer

TRAINABLE = choices(Trainable)


class TeacherStudentMixer(nn.Module):
    def __init__(self, attention: nn.Module, mamba: Mamba2Mixer):
        super().__init__()
        self.attention = attention
        self.mamba = mamba
        self.teacher_mode = False
        self.active = True  # False: not converted yet in this stage, the student runs the attention too

    def forward(self, *args, **kwargs):
        return (self.attention if self.teacher_mode or not self.active else self.mamba)(*args, **kwargs)


class Replay(nn.Module):
    """Stands in for a frozen decoder layer during the student pass: returns what that layer returned in the
    teacher pass, which ran it on the same input."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class SharedTeacherStudent:
    """The student model, whose converted layers also carry the teacher's attention."""

    def __init__(self, student: nn.Module, attentions: dict[int, nn.Module], trainable: str = "mamba",
                 separate_teacher: nn.Module | None = None, later_trainables: tuple[str, ...] = ()):
        """`later_trainables`: the other `trainable` settings of a stepwise run, whose teacher-side
        copies are made here, once."""
        modes = {trainable, *later_trainables}
        if not modes <= set(TRAINABLE):
            raise ValueError(f"trainable must be one of {TRAINABLE}")
        self.model, self.layers, self.trainable = student, sorted(attentions), trainable
        self.active = list(self.layers)
        layout = find_decoder(student)
        self.text_model, self.decoder_layers = layout.text_model, layout.layers
        self._slots = [(layout.layers[i], layout.attention_name) for i in self.layers]
        self.duals = []
        for (layer, name), idx in zip(self._slots, self.layers):
            dual = TeacherStudentMixer(attentions[idx], getattr(layer, name))
            setattr(layer, name, dual)
            self.duals.append(dual)
        self.separate_teacher = separate_teacher
        self.connector_path = next((n for n, _ in student.named_modules() if n.endswith("multi_modal_projector")), None)
        self.teacher_connector = None
        if "mamba+connector" in modes and self.connector_path:
            self.teacher_connector = copy.deepcopy(student.get_submodule(self.connector_path))
        # The teacher's own converted layers (its attention, norms and MLP), for the teacher path while
        # the student's copies of them train.
        self.teacher_blocks: dict[int, nn.Module] = {}
        if "converted" in modes and separate_teacher is None:
            for (layer, name), idx, dual in zip(self._slots, self.layers, self.duals):
                setattr(layer, name, dual.attention)
                self.teacher_blocks[idx] = copy.deepcopy(layer).requires_grad_(False)
                setattr(layer, name, dual)
        self._set_trainable()

    def compile_frozen_parts(self, dynamic: bool | None = True) -> list[type]:
        """torch.compile each decoder layer's attention, MLP and norms on their own (regional compilation:
        one small graph per module class, shared by every layer and by the teacher and the student pass).
        It fuses the elementwise work around the matmuls (Phi-2's tanh GELU is eight kernels eager). The
        Mamba-2 mixers stay eager: their scans are already fused kernels. `dynamic`: True compiles for any
        sequence length at once; None compiles the first shape as it is and makes a dimension dynamic
        only once it changes (batches of a few fixed shapes). Returns the compiled module classes."""
        compiled = []
        for layer in self.decoder_layers:
            for child in layer.children():
                module = child.attention if isinstance(child, TeacherStudentMixer) else child
                if not isinstance(module, Mamba2Mixer):
                    module.compile(dynamic=dynamic)
                    compiled.append(type(module))
        return list(dict.fromkeys(compiled))

    def teacher_parameters(self) -> int:
        """The teacher's parameter count: the shared model less its Mamba-2 mixers (or the separate teacher's)."""
        if self.separate_teacher is not None:
            return sum(p.numel() for p in self.separate_teacher.parameters())
        return sum(p.numel() for p in self.model.parameters()) - sum(p.numel() for d in self.duals for p in d.mamba.parameters())

    def move_teacher_copies(self, device) -> None:
        """The teacher-side copies live outside the model the accelerator prepares: they follow it here."""
        if self.teacher_connector is not None:
            self.teacher_connector.to(device)
        if self.separate_teacher is not None:
            self.separate_teacher.to(device)
        for block in self.teacher_blocks.values():
            block.to(device)

    def text_decoders(self) -> list[nn.Module]:
        """Every text decoder a forward pass runs: the model's, the teacher's copies of trained layers and
        the separate teacher's (`packed_attention` switches their attention)."""
        decoders = [self.text_model, *self.teacher_blocks.values()]
        if self.separate_teacher is not None:
            decoders.append(find_decoder(self.separate_teacher).text_model)
        return decoders

    def set_stage(self, layers: list[int], trainable: str) -> None:
        """The student runs Mamba-2 in `layers` (a subset of the converted ones) and trains `trainable`."""
        self.active, self.trainable = sorted(layers), trainable
        for idx, dual in zip(self.layers, self.duals):
            dual.active = idx in self.active
        self._set_trainable()

    def trainable_in_any(self, stages: list[tuple[list[int], str]]) -> set[str]:
        """Names of the parameters that some stage trains (the optimizer holds them all from the start).
        Names, not the parameter objects: FSDP2 replaces those with sharded ones when the model is prepared."""
        current, found = (self.active, self.trainable), set()
        for layers, trainable in stages:
            self.set_stage(layers, trainable)
            found |= {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.set_stage(*current)
        return found

    def _set_trainable(self) -> None:
        self.model.requires_grad_(self.trainable == "all")
        for (layer, _), idx, dual in zip(self._slots, self.layers, self.duals):
            if self.trainable == "converted":
                layer.requires_grad_(idx in self.active)
            dual.attention.requires_grad_(False)
            dual.mamba.requires_grad_(idx in self.active)
        for block in self.teacher_blocks.values():
            block.requires_grad_(False)
        if self.teacher_connector is not None:
            self.teacher_connector.requires_grad_(False)
            self.model.get_submodule(self.connector_path).requires_grad_(self.trainable in ("mamba+connector", "all"))
        if self.separate_teacher is not None:
            self.separate_teacher.requires_grad_(False).eval()

    def _swap_connector(self, module: nn.Module) -> nn.Module:
        parent_name, _, child = self.connector_path.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        previous = getattr(parent, child)
        setattr(parent, child, module)
        return previous

    @contextmanager
    def teacher_path(self, model: nn.Module):
        """Yields the module whose forward is exactly the teacher's (`model` may be accelerate-wrapped)."""
        if self.separate_teacher is not None:
            yield self.separate_teacher
            return
        for dual in self.duals:
            dual.teacher_mode = True
        student_connector = self._swap_connector(self.teacher_connector) if self.teacher_connector is not None else None
        for idx, block in self.teacher_blocks.items():
            self.decoder_layers[idx] = block
        try:
            yield model
        finally:
            for dual in self.duals:
                dual.teacher_mode = False
            if student_connector is not None:
                self._swap_connector(student_connector)
            for (layer, _), idx in zip(self._slots, self.layers):
                if idx in self.teacher_blocks:
                    self.decoder_layers[idx] = layer

    @contextmanager
    def student_only(self):
        """The model as a plain hybrid (Mamba-2 mixers where attention was), e.g. for saving."""
        for (layer, name), dual in zip(self._slots, self.duals):
            setattr(layer, name, dual.mamba)
        try:
            yield self.model
        finally:
            for (layer, name), dual in zip(self._slots, self.duals):
                setattr(layer, name, dual)

    def shared_prefix(self) -> int | None:
        """How many leading decoder layers the student computes exactly as the teacher does: those before the
        first converted layer, when nothing in or before them trains. None when the student's inputs already
        differ (a trained connector, everything trained, a separate teacher)."""
        if self.separate_teacher is not None or self.teacher_connector is not None:
            return None
        return self.layers[0] if self.trainable in ("mamba", "converted") else None

    @contextmanager
    def replaying(self, count: int, output):
        """The first `count` decoder layers return `output`, the teacher pass's output of layer count - 1."""
        originals = [self.decoder_layers[i] for i in range(count)]
        for i in range(count):
            self.decoder_layers[i] = Replay(output)
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                self.decoder_layers[i] = layer

    def decoder_layer(self, idx: int) -> nn.Module:
        return self._slots[self.layers.index(idx)][0]

    def teacher_layer(self, idx: int) -> nn.Module:
        """The decoder layer the teacher pass runs at `idx` (the layer loss captures its input and output)."""
        if self.separate_teacher is not None:
            return find_decoder(self.separate_teacher).layers[idx]
        return self.teacher_blocks[idx] if idx in self.teacher_blocks else self.decoder_layer(idx)
