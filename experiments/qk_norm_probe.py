"""Carrying a teacher's per-head q/k norms into the mixer (RMSNorms on C and B with the same gains) against
dropping them, on tiny random Qwen3, Qwen3-VL and Gemma 3 teachers whose norm gains are drawn from
[0.5, 1.5] (tests/zoo.py), so that a dropped norm shows.

For each teacher and each way, both converted layers (0 and 2) are fitted to their attention's outputs
alone (the layer loss: 150 Adam steps, lr 1e-3, random tokens, batch 8 x 64), and reported are
- the layer error: |mixer(h) - attention(h)|^2 / |attention(h)|^2 on held-out tokens, before and after;
- the hybrid's next-token KL from the teacher on held-out tokens, before and after.
The same again with each head's q/k projection rows multiplied by a factor in [1, 8], which leaves such a
teacher exactly as it was (its norms undo the factor), as a trained model's pre-norm q/k sizes vary.

    python experiments/qk_norm_probe.py      (from the repository root; about a minute on 2 CPU cores)

Output: docs/results/convert/qk-norm-probe.json.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import zoo  # noqa: E402

from matvlm_cli.hybrid.conversion import convert_to_hybrid, find_decoder  # noqa: E402

LAYERS, STEPS, LR = [0, 2], 150, 1e-3
torch.set_num_threads(2)


def attention_io(teacher, ids):
    """(input hidden states, attention output) of each converted layer of the teacher."""
    layout, seen, hooks = find_decoder(teacher), {}, []
    for i in LAYERS:
        def hook(module, args, kwargs, output, i=i):
            seen[i] = (kwargs.get("hidden_states", args[0] if args else None), output[0])
        hooks.append(layout.attention(i).register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return seen, logits


def layer_error(mixers, seen):
    with torch.no_grad():
        return {i: float(((mixers[i](h)[0] - y).pow(2).sum() / y.pow(2).sum())) for i, (h, y) in seen.items()}


def kl(student, ids, teacher_logits):
    with torch.no_grad():
        s = F.log_softmax(student(input_ids=ids).logits.float(), -1)
    return float(F.kl_div(s, F.log_softmax(teacher_logits.float(), -1), log_target=True, reduction="batchmean") / ids.shape[1])


def scale_qk(model):
    """Multiply each head's q and k projection rows by a factor in [1, 8]: a teacher with per-head q/k norms
    computes exactly the same (its norms undo it), as a trained model's pre-norm q/k sizes vary."""
    generator = torch.Generator().manual_seed(5)
    layout = find_decoder(model)
    with torch.no_grad():
        for layer in layout.layers:
            attn = getattr(layer, layout.attention_name)
            for proj in (attn.q_proj, attn.k_proj):
                heads = proj.out_features // attn.head_dim
                factors = torch.empty(heads).uniform_(1.0, 8.0, generator=generator).repeat_interleave(attn.head_dim)
                proj.weight.mul_(factors[:, None])
    return model


def build(family, scaled):
    model = zoo.build(family, seed=0)
    return scale_qk(model) if scaled else model


results = {}
for family, scaled in (("qwen3", False), ("qwen3_vl", False), ("gemma3", False), ("qwen3", True), ("gemma3", True)):
    name = family + (" (q/k projections x1-8 per head)" if scaled else "")
    teacher = build(family, scaled)
    held_out = torch.randint(4, 240, (8, 64), generator=torch.Generator().manual_seed(123))
    seen_held, teacher_logits = attention_io(teacher, held_out)
    for way, carry in (("carried", True), ("dropped", False)):
        student = build(family, scaled)
        convert_to_hybrid(student, LAYERS, qk_norms=carry)
        mixers = {i: find_decoder(student).attention(i) for i in LAYERS}
        before = (layer_error(mixers, seen_held), kl(student, held_out, teacher_logits))
        params = [p for m in mixers.values() for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        generator = torch.Generator().manual_seed(7)
        for step in range(STEPS):
            seen, _ = attention_io(teacher, torch.randint(4, 240, (8, 64), generator=generator))
            loss = sum(((mixers[i](h)[0] - y).pow(2).sum() / y.pow(2).sum()) for i, (h, y) in seen.items())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = (layer_error(mixers, seen_held), kl(student, held_out, teacher_logits))
        results.setdefault(name, {})[way] = {
            "layer_error_before": {str(k): round(v, 4) for k, v in before[0].items()}, "kl_before": round(before[1], 5),
            "layer_error_after": {str(k): round(v, 4) for k, v in after[0].items()}, "kl_after": round(after[1], 5),
        }
        print(name, way, json.dumps(results[name][way]), flush=True)
Path("docs/results/convert/qk-norm-probe.json").write_text(json.dumps(results, indent=1) + "\n")
