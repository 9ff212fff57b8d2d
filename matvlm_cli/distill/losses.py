"""The distillation losses of MaTVLM (method.md §5): L = a*L_prob + b*L_layer + c*L_ce."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_loss(student_logits, teacher_logits, positions: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmax at temperature T, times T², averaged over `positions`."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    weights = positions.float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1) * t * t


def layer_loss(student_out, teacher_out, mask: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Distance between a replaced layer's output on the teacher's input and the teacher's output."""
    diff = student_out.float() - teacher_out.float()
    if kind == "l2":
        per_token = diff.norm(dim=-1)
    elif kind == "mse":
        per_token = diff.pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1 - F.cosine_similarity(student_out.float(), teacher_out.float(), dim=-1)
    else:
        raise ValueError(f"unknown layer loss {kind!r}")
    weights = mask.float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def ce_loss(student_logits, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens (labels -100 elsewhere)."""
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
