"""The distillation losses of MaTVLM (arXiv 2503.13440; docs/distill.md): L = a*L_prob + b*L_layer + c*L_ce."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


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


# fp32 logits of this many elements at most per chunk: 2**27 is 512 MiB, about 2600 positions of a 51k
# vocabulary. Full fp32 logits of a batch of 16 x 1024 positions would be 3.4 GB per copy.
CHUNK_ELEMENTS = 2**27


def chunked_logit_losses(student_head, teacher_head, student_hidden, teacher_hidden, kl_positions: torch.Tensor | None,
                         labels: torch.Tensor | None, temperature: float = 1.0, softcap: float | None = None,
                         chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """`kl_loss` and `ce_loss` computed from the final hidden states, a chunk of positions at a time:
    each chunk's logits are made, used and dropped, and recomputed in the backward pass, so neither
    model's full fp32 logits are ever held. Same values as the unchunked losses. `kl_positions` None
    skips the KL, `labels` None the CE."""
    vocab = student_head.weight.shape[0]
    wanted = torch.zeros(student_hidden.shape[:2], dtype=torch.bool, device=student_hidden.device)
    if kl_positions is not None:
        wanted |= kl_positions.bool()
    if labels is not None:
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]  # position p predicts token p + 1
        wanted |= targets != -100
    rows = wanted.nonzero(as_tuple=True)
    student, teacher = student_hidden[rows], teacher_hidden[rows]
    kl_weight = kl_positions[rows].float() if kl_positions is not None else None
    target = targets[rows] if labels is not None else None

    def logits(head, hidden):
        out = head(hidden).float()
        return out if softcap is None else torch.tanh(out / softcap) * softcap

    def chunk_sums(s, t, w, y):
        student_logits = logits(student_head, s)
        sums = []
        if w is not None:
            log_student = F.log_softmax(student_logits / temperature, dim=-1)
            with torch.no_grad():
                log_teacher = F.log_softmax(logits(teacher_head, t) / temperature, dim=-1)
            sums.append(((log_teacher.exp() * (log_teacher - log_student)).sum(-1) * w).sum())
        if y is not None:
            sums.append(F.cross_entropy(student_logits, y, ignore_index=-100, reduction="sum"))
        return torch.stack(sums)

    size = max(1, chunk_elements // vocab)
    total = torch.zeros(int(kl_weight is not None) + int(target is not None), device=student_hidden.device)
    for start in range(0, len(student), size):
        piece = slice(start, start + size)
        args = (student[piece], teacher[piece], None if kl_weight is None else kl_weight[piece], None if target is None else target[piece])
        total = total + torch.utils.checkpoint.checkpoint(chunk_sums, *args, use_reentrant=False)
    parts, i = {}, 0
    if kl_weight is not None:
        parts["kl"] = total[i] / kl_positions.float().sum().clamp(min=1) * temperature**2
        i += 1
    if target is not None:
        parts["ce"] = total[i] / (targets != -100).sum().clamp(min=1)
    return parts
