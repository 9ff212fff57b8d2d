"""One model that is both teacher and student.

Frozen parts (vision tower, embeddings, norms, MLPs, unconverted layers) exist once. Each converted
layer holds a `TeacherStudentMixer`: the teacher's attention and the student's Mamba-2 mixer side
by side, and `teacher_path()` switches every one of them for the teacher's forward pass. MaTVLM's
code keeps two full models instead, which doubles the weight memory.

When the connector is trained (`mamba+connector`) a frozen copy of it serves the teacher path, so
the teacher stays the teacher; when everything is trained (`all`) the teacher is a separate copy.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from torch import nn

from ..hybrid.conversion import find_decoder
from ..hybrid.mamba2 import Mamba2Mixer

TRAINABLE = ("mamba", "mamba+connector", "all")


class TeacherStudentMixer(nn.Module):
    def __init__(self, attention: nn.Module, mamba: Mamba2Mixer):
        super().__init__()
        self.attention = attention
        self.mamba = mamba
        self.teacher_mode = False

    def forward(self, *args, **kwargs):
        return (self.attention if self.teacher_mode else self.mamba)(*args, **kwargs)


class SharedTeacherStudent:
    """The student model, whose converted layers also carry the teacher's attention."""

    def __init__(self, student: nn.Module, attentions: dict[int, nn.Module], trainable: str = "mamba",
                 separate_teacher: nn.Module | None = None):
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}")
        self.model, self.layers, self.trainable = student, sorted(attentions), trainable
        layout = find_decoder(student)
        self.decoder_layers = layout.layers
        self._slots = [(layout.layers[i], layout.attention_name) for i in self.layers]
        self.duals = []
        for (layer, name), idx in zip(self._slots, self.layers):
            dual = TeacherStudentMixer(attentions[idx], getattr(layer, name))
            setattr(layer, name, dual)
            self.duals.append(dual)
        self.separate_teacher = separate_teacher
        self.connector_path = next((n for n, _ in student.named_modules() if n.endswith("multi_modal_projector")), None)
        self.teacher_connector = None
        if trainable == "mamba+connector" and self.connector_path:
            self.teacher_connector = copy.deepcopy(student.get_submodule(self.connector_path))
        self._set_trainable()

    def compile_frozen_parts(self) -> None:
        """torch.compile each decoder layer's attention, MLP and norms on their own, dynamic in the sequence
        length (regional compilation: one small graph per module, shared by the teacher and the student
        pass). It fuses the elementwise work around the matmuls (Phi-2's tanh GELU is eight kernels
        eager). The Mamba-2 mixers stay eager: their scans are already fused kernels."""
        for layer in self.decoder_layers:
            for child in layer.children():
                if isinstance(child, TeacherStudentMixer):
                    child.attention.compile(dynamic=True)
                elif not isinstance(child, Mamba2Mixer):
                    child.compile(dynamic=True)

    def _set_trainable(self) -> None:
        self.model.requires_grad_(self.trainable == "all")
        for dual in self.duals:
            dual.attention.requires_grad_(False)
            dual.mamba.requires_grad_(True)
        if self.teacher_connector is not None:
            self.teacher_connector.requires_grad_(False)
            self.model.get_submodule(self.connector_path).requires_grad_(True)
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
        try:
            yield model
        finally:
            for dual in self.duals:
                dual.teacher_mode = False
            if student_connector is not None:
                self._swap_connector(student_connector)

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

    def decoder_layer(self, idx: int) -> nn.Module:
        return self._slots[self.layers.index(idx)][0]

    def teacher_layer(self, idx: int) -> nn.Module:
        """The decoder layer the teacher pass runs at `idx` (the layer loss captures its input and output)."""
        if self.separate_teacher is not None:
            return find_decoder(self.separate_teacher).layers[idx]
        return self.decoder_layer(idx)
