"""What a distillation step minimises: one teacher pass and one student pass over a batch, then the KL
and CE losses on their logits (made chunk by chunk, losses.py) and the layer loss between each converted
layer's output and the teacher's."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate import Accelerator
from torch import nn

from ..hybrid.packed import packed_attention
from ..recipes import LossWeights
from .losses import chunked_logit_losses, layer_loss
from .shared import SharedTeacherStudent


def loss_weights(losses: LossWeights) -> dict[str, float]:
    return {"kl": losses.kl_weight, "layer": losses.layer_weight, "ce": losses.ce_weight}


def weighted_total(parts: dict[str, torch.Tensor], losses: LossWeights) -> torch.Tensor:
    """The loss a step minimises: the components that have a weight, weighted."""
    return sum(w * parts[k] for k, w in loss_weights(losses).items() if w)


class FinalHiddenStates(nn.Module):
    """Stands in for the LM head during one forward pass: keeps the final hidden states and returns
    logits with no vocabulary (an empty last dimension), so the losses make logits chunk by chunk."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.value = hidden
        return hidden[..., :0]


@contextmanager
def final_hidden_states(model: nn.Module):
    """`model`'s forward returns empty logits while this is open; yields the stand-in that holds the final
    hidden states."""
    head = model.get_output_embeddings()
    stand_in = FinalHiddenStates()
    model.set_output_embeddings(stand_in)
    try:
        yield stand_in
    finally:
        model.set_output_embeddings(head)


def first_output(output):
    return output[0] if isinstance(output, tuple) else output


class LayerCapture:
    """Records, in one teacher pass, each replaced layer's call arguments and output."""

    def __init__(self, layers: dict[int, torch.nn.Module]):
        self.active, self.calls, self.outputs = False, {}, {}
        self.handles = []
        for idx, layer in layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._pre(idx), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(idx)))

    def _pre(self, idx):
        def hook(module, args, kwargs):
            if self.active:
                self.calls[idx] = (args, kwargs)
        return hook

    def _post(self, idx):
        def hook(module, args, output):
            if self.active:
                self.outputs[idx] = first_output(output)
        return hook


class OutputTap:
    """`value`: what the module returned in the forward passes while the tap was open (None when no module)."""

    def __init__(self):
        self.value = None


@contextmanager
def output_of(module: nn.Module | None):
    tap = OutputTap()
    if module is None:
        yield tap
        return
    handle = module.register_forward_hook(lambda _module, _args, output: setattr(tap, "value", output))
    try:
        yield tap
    finally:
        handle.remove()


class DistillationObjective:
    """The loss components of one batch for the prepared `model`, under a stage's `LossWeights`."""

    def __init__(self, accelerator: Accelerator, shared: SharedTeacherStudent):
        self.accelerator, self.shared = accelerator, shared
        self.capture = LayerCapture({idx: shared.teacher_layer(idx) for idx in shared.layers})
        # Gemma 2's tanh soft-capping of the logits, which the chunked losses apply after the head.
        self.logit_softcap = getattr(shared.model.config.get_text_config(), "final_logit_softcapping", None)

    def _prefix_end(self, prefix: int | None) -> nn.Module | None:
        """The teacher's last layer before the first converted one (None: nothing to replay)."""
        return self.shared.decoder_layers[prefix - 1] if prefix else None

    def __call__(self, model: nn.Module, batch: dict, losses: LossWeights) -> dict[str, torch.Tensor]:
        if "seq_idx" not in batch.get("model_inputs", ()):
            return self._losses(model, batch, losses)
        # Packed rows: every text decoder attends within records (hybrid/packed.py). The number of records
        # changes from batch to batch: compiled attention takes their boundaries at any length, rather than
        # compiling once per count (dynamo does not make a dimension reached through **kwargs dynamic itself).
        torch._dynamo.mark_dynamic(batch["cu_seq_lens_q"], 0)
        with packed_attention(*self.shared.text_decoders()):
            return self._losses(model, batch, losses)

    def _losses(self, model: nn.Module, batch: dict, weights: LossWeights) -> dict[str, torch.Tensor]:
        acc = self.accelerator
        # No cache: a training forward never continues from it, and building one per pass made torch.compile
        # recompile on its state (issue 25).
        inputs = {k: batch[k] for k in ("input_ids", *batch.get("model_inputs", ())) if k in batch} | {"use_cache": False}
        student_model = acc.unwrap_model(model)
        # The layers before the first converted one are frozen and see the teacher's input, so the student pass
        # replays their teacher output, and that converted layer's layer loss reuses its student-pass output
        # (its input is the teacher's). Same values, less work per step.
        prefix = self.shared.shared_prefix()
        with torch.no_grad(), self.shared.teacher_path(model) as teacher:
            teacher_model = acc.unwrap_model(teacher)
            teacher_head = teacher_model.get_output_embeddings()
            with final_hidden_states(teacher_model) as teacher_hidden, output_of(self._prefix_end(prefix)) as prefix_out:
                self.capture.active = True
                teacher(**inputs)
                self.capture.active = False
        student_head = student_model.get_output_embeddings()
        # Reused only while the first converted layer runs Mamba-2 in this stage (else it has no layer loss).
        reuse_first = prefix is not None and self.shared.active[0] == prefix
        first = self.shared.decoder_layer(prefix) if reuse_first else None
        with final_hidden_states(student_model) as student_hidden, self.shared.replaying(prefix or 0, prefix_out.value), \
                output_of(first) as first_out:
            model(**inputs)
        mask = batch["attention_mask"].bool()
        parts = {}
        if weights.kl_weight or weights.ce_weight:
            positions = (mask if weights.kl_positions == "all" else batch["labels"] != -100) if weights.kl_weight else None
            with acc.autocast():  # the heads run outside the prepared model's forward
                parts |= chunked_logit_losses(
                    student_head, teacher_head, student_hidden.value, teacher_hidden.value, positions,
                    batch["labels"] if weights.ce_weight else None, weights.kl_temperature, softcap=self.logit_softcap,
                )
        if weights.layer_weight:
            distances = []
            for idx in self.shared.active:
                if first is not None and idx == prefix:
                    student_out = first_output(first_out.value)
                else:
                    args, kwargs = self.capture.calls[idx]
                    layer = self.shared.decoder_layer(idx)
                    with acc.autocast():  # the prepared model's forward autocasts; this call is outside it
                        student_out = first_output(layer(*args, **kwargs))
                distances.append(layer_loss(student_out, self.capture.outputs[idx], mask, weights.layer_loss))
            parts["layer"] = torch.stack(distances).mean()
        return parts
