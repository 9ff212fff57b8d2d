"""`--placement scored`: which decoder layers to convert, chosen from what converting each one costs.

Each layer is scored alone: its attention is replaced by a Mamba-2 mixer initialised from it (as
convert does), that one mixer is fitted for `FIT_STEPS` steps to the teacher's layer output on the
calibration records (the layer loss of distillation, docs/distill.md), and the model with it is
compared with the teacher: the mean next-token KL(teacher || hybrid) on the answer tokens. The k
cheapest layers are converted. The same KL before the fit is kept beside it (it is what the layer
probe in experiments/layer_probe.py measures, and it ranks layers differently: docs/placement.md).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from .distill.data import RecordReader, collate
from .distill.losses import layer_loss
from .distill.records import BrokenRecord, RecordEncoder, image_token_count, iter_json_list
from .errors import MatvlmError
from .hybrid.conversion import DecoderLayout, attention_geometry, mixer_config_for, mixer_from_attention, qk_norm_eps

# The short fit of one mixer before it is scored: enough for the mixer to stop being its raw attention
# initialisation (the layer loss of the embedded teacher's layers falls by 40-70 % in these steps), far
# too few to say what a full distillation reaches.
FIT_STEPS = 60
FIT_LR = 2e-3
BATCH_SIZE = 8
# A global layer of a sliding-window teacher is converted before window layers unless it costs more than
# this many times the median layer (see pick_scored).
OUTLIER = 5.0


@dataclass(frozen=True)
class LayerScore:
    layer: int
    kl: float  # mean next-token KL(teacher || hybrid) on answer tokens, the one mixer fitted
    kl_unfitted: float  # the same with the mixer as initialised from attention
    layer_loss: float  # the fitted mixer's layer loss (L2 per token) at the end of the fit


@dataclass(frozen=True)
class Calibration:
    source: str
    records: int
    batches: list[dict]


class _FixedMask:
    """Stands in for the mixer's padding-mask tap: the scorer calls layers on their own, outside the
    model's forward that would record the mask."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def for_last(self, length: int) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[:, -length:]


def calibration_records(data: Path, image_root: Path, processor, count: int, seed: int, max_length: int) -> tuple[list[dict], int]:
    """`count` image records drawn from a LLaVA-format JSON list (a reservoir sample, so a large file is
    streamed once and the draw depends only on the seed), encoded as distillation encodes them."""
    if not data.is_file():
        raise MatvlmError(f"calibration: {data} does not exist")
    rng, sample, seen, total = random.Random(seed), [], 0, 0
    try:
        for record in iter_json_list(data):
            total += 1
            if not (isinstance(record, dict) and isinstance(record.get("image"), str)):
                continue
            seen += 1
            if len(sample) < count:
                sample.append(record)
            elif (j := rng.randrange(seen)) < count:
                sample[j] = record
    except MatvlmError as err:
        raise MatvlmError(f"calibration: {err}") from None
    if total == 0:
        raise MatvlmError(f"calibration: {data} holds no records")
    if seen == 0:
        raise MatvlmError(f"calibration: {data} has no image records ({total} text-only); scoring needs images")
    encoder = RecordEncoder(processor, max_length, image_token_count(processor))
    reader = RecordReader(processor, image_token_count(processor), max_length)
    items, broken = [], []
    for record in sample:
        try:
            encoded = encoder.encode(record, image_root)
        except BrokenRecord as why:
            broken.append(f"{record.get('id', '?')}: {why}")
            continue
        item = reader.read({"id": str(record.get("id", "?"))} | encoded | {"label_spans": encoded["label_spans"].reshape(-1, 2)}, image_root)
        if "broken" in item:
            broken.append(f"{item['id']}: {item['broken']}")
        else:
            items.append(item)
    if not items:
        raise MatvlmError(f"calibration: none of the {len(sample)} image records drawn from {data} is usable (e.g. {broken[0]})")
    return items, len(broken)


def load_calibration(data: str | None, image_root: str | None, processor, count: int, seed: int,
                     max_length: int, console: Console) -> Calibration:
    """The calibration batches: from a data JSON (images relative to `image_root`, by default the JSON's
    folder), or from the embedded world's training conversations."""
    if count < 1:
        raise MatvlmError(f"calibration_records: must be positive, got {count}")
    if data is None:
        from .distill.loaders import embedded_world_sources

        source = embedded_world_sources(console)[0]
        path, root = Path(source.json), Path(source.image_root)
    else:
        path = Path(data)
        root = Path(image_root) if image_root else path.parent
    items, broken = calibration_records(path, root, processor, count, seed, max_length)
    if broken:
        console.print(f"[yellow]calibration:[/yellow] {broken} of the drawn records skipped (unreadable or too long)")
    pad = processor.tokenizer.pad_token_id
    batches = [collate(items[i : i + BATCH_SIZE], pad_id=pad) for i in range(0, len(items), BATCH_SIZE)]
    return Calibration(str(path), len(items), batches)


def _inputs(batch: dict, device: torch.device) -> dict:
    keys = ("input_ids", "attention_mask", *batch["model_inputs"])
    return {k: batch[k].to(device) for k in keys}


def _answer_positions(batch: dict) -> torch.Tensor:
    """Positions whose next token is an answer token: the logits there predict the answers."""
    labels = batch["labels"]
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    return positions


def _answer_log_probs(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    logits = model(**_inputs(batch, device), use_cache=False).logits
    return F.log_softmax(logits[_answer_positions(batch).to(device)].float(), dim=-1)


def _kl(model: nn.Module, batches: list[dict], teacher: list[torch.Tensor], device: torch.device) -> float:
    total, count = 0.0, 0
    for batch, log_teacher in zip(batches, teacher):
        log_student = _answer_log_probs(model, batch, device)
        total += float((log_teacher.exp() * (log_teacher - log_student)).sum())
        count += len(log_teacher)
    return total / max(1, count)


class _LayerCapture:
    """The arguments and output of one decoder layer in each teacher forward."""

    def __init__(self, layer: nn.Module):
        self.calls: list[tuple] = []
        self.handles = [layer.register_forward_pre_hook(self._pre, with_kwargs=True), layer.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        self.calls.append([args, kwargs, None])

    def _post(self, module, args, output):
        self.calls[-1][2] = (output[0] if isinstance(output, tuple) else output).detach()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _fit(layout: DecoderLayout, idx: int, mixer: nn.Module, calls: list, batches: list[dict], tap: _FixedMask,
         steps: int, device: torch.device) -> float:
    """`steps` Adam steps of the layer loss for this one mixer, cycling over the calibration batches."""
    layer = layout.layers[idx]
    optimizer = torch.optim.Adam(mixer.parameters(), lr=FIT_LR)
    loss = torch.zeros(())
    for step in range(steps):
        args, kwargs, target = calls[step % len(calls)]
        mask = batches[step % len(calls)]["attention_mask"].to(device)
        tap.mask = mask
        out = layer(*args, **kwargs)
        loss = layer_loss(out[0] if isinstance(out, tuple) else out, target, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # the fitted mixer's loss over every batch, not the last step's batch alone
        losses = []
        for (args, kwargs, target), batch in zip(calls, batches):
            tap.mask = batch["attention_mask"].to(device)
            out = layer(*args, **kwargs)
            losses.append(float(layer_loss(out[0] if isinstance(out, tuple) else out, target, tap.mask)))
    return sum(losses) / len(losses)


class _Scorer:
    """What scoring needs once: the teacher's answer log-probabilities and every layer's input and output
    (one teacher pass records them all: a few GB for a 3B model's 64 records). `score` converts one more
    layer on top of those `install`ed, fits it, and measures the model against the teacher."""

    def __init__(self, model: nn.Module, layout: DecoderLayout, batches: list[dict], seed: int, fit_steps: int):
        self.model, self.layout, self.batches, self.seed, self.fit_steps = model, layout, batches, seed, fit_steps
        self.device = next(model.parameters()).device
        geometry = attention_geometry(layout.attention(0), model.config.get_text_config(decoder=True))
        self.geometry = geometry
        self.config = mixer_config_for(geometry, bc_norm_eps=qk_norm_eps(layout.attention(0), layout.family))
        self.attentions = {i: layout.attention(i) for i in range(len(layout.layers))}
        self.tap = _FixedMask()  # every mixer of the scorer reads its padding mask here
        self.installed: dict[int, nn.Module] = {}
        torch.manual_seed(seed)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        # A half-precision teacher scores under autocast, with the fitted mixers' weights in fp32.
        dtype = next(model.parameters()).dtype
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)
        captures = [_LayerCapture(layer) for layer in layout.layers]
        try:
            with torch.no_grad():
                self.teacher = [_answer_log_probs(model, batch, self.device) for batch in batches]
        finally:
            for capture in captures:
                capture.remove()
        self.calls = [capture.calls for capture in captures]

    def _set(self, idx: int, module: nn.Module) -> None:
        setattr(self.layout.layers[idx], self.layout.attention_name, module)

    def score(self, idx: int) -> tuple[LayerScore, nn.Module]:
        mixer = mixer_from_attention(self.attentions[idx], self.geometry, self.config, idx, self.seed, self.layout.family).float()
        mixer.padding_mask_tap = self.tap
        self._set(idx, mixer)
        try:
            with self.autocast:
                with torch.no_grad(), _mask_from(self.model, self.tap):
                    unfitted = _kl(self.model, self.batches, self.teacher, self.device)
                fitted_loss = _fit(self.layout, idx, mixer, self.calls[idx], self.batches, self.tap, self.fit_steps, self.device)
                with torch.no_grad(), _mask_from(self.model, self.tap):
                    fitted = _kl(self.model, self.batches, self.teacher, self.device)
        finally:
            self._set(idx, self.installed.get(idx, self.attentions[idx]))
        return LayerScore(idx, round(fitted, 6), round(unfitted, 6), round(fitted_loss, 6)), mixer

    def install(self, idx: int, mixer: nn.Module) -> None:
        self.installed[idx] = mixer
        self._set(idx, mixer)

    def restore(self) -> None:
        for idx in list(self.installed):
            self._set(idx, self.attentions[idx])
        self.installed.clear()


def _progress(console: Console, total: int) -> Progress:
    return Progress(TextColumn("[bold]scoring layers[/bold] {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("{task.fields[last]}"), TimeRemainingColumn(), console=console)


def score_layers(model: nn.Module, layout: DecoderLayout, batches: list[dict], seed: int = 0, fit_steps: int = FIT_STEPS,
                 console: Console | None = None) -> list[LayerScore]:
    """Each decoder layer's cost when it alone is converted (see the module's docstring). `model` is left
    as it came: each layer's attention is put back after its score."""
    was_training = model.training
    scorer = _Scorer(model, layout, batches, seed, fit_steps)
    scores = []
    with _progress(console or Console(), len(layout.layers)) as progress:
        task = progress.add_task("score", total=len(layout.layers), last="")
        for idx in range(len(layout.layers)):
            score, _ = scorer.score(idx)
            scores.append(score)
            progress.update(task, advance=1, last=f"layer {idx}: KL {score.kl:.4g}")
    model.train(was_training)
    return scores


def greedy_layers(model: nn.Module, layout: DecoderLayout, batches: list[dict], k: int, seed: int = 0,
                  fit_steps: int = FIT_STEPS, console: Console | None = None) -> list[list[LayerScore]]:
    """The iterative variant: convert the cheapest layer (its fitted mixer stays), re-score the rest with it
    converted, and so on k times. Returns each round's scores; round r's cheapest is the r-th layer chosen."""
    was_training = model.training
    scorer = _Scorer(model, layout, batches, seed, fit_steps)
    n = len(layout.layers)
    rounds = []
    try:
        with _progress(console or Console(), sum(n - r for r in range(k))) as progress:
            task = progress.add_task("score", total=sum(n - r for r in range(k)), last="")
            for _ in range(k):
                results = []
                for idx in (i for i in range(n) if i not in scorer.installed):
                    results.append(scorer.score(idx))
                    progress.update(task, advance=1, last=f"layer {idx}: KL {results[-1][0].kl:.4g}")
                best, mixer = min(results, key=lambda r: (r[0].kl, r[0].layer))
                scorer.install(best.layer, mixer)
                rounds.append([score for score, _ in results])
    finally:
        scorer.restore()
    model.train(was_training)
    return rounds


class _mask_from:
    """While open, the tap holds the 2-D padding mask of each whole-model forward call."""

    def __init__(self, model: nn.Module, tap: _FixedMask):
        self.model, self.tap = model, tap

    def __enter__(self):
        def hook(module, args, kwargs):
            self.tap.mask = kwargs.get("attention_mask")
        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)

    def __exit__(self, *exc):
        self.handle.remove()


def pick_scored(scores: list[LayerScore], k: int, windows: list[int | None] | None = None) -> tuple[list[int], list[int]]:
    """The k cheapest layers, and the global layers demoted on the way. On a teacher that mixes
    sliding-window and global attention the global layers come first (each frees the whole context's KV
    cache, a window layer at most its window), cheapest first, unless the scores say otherwise: a global
    layer that costs more than `OUTLIER` times the median layer is one whose conversion breaks the model
    (the embedded teacher's layer 0: 6-11x the median with seeds 0-2, POPE 0.00 once converted), so it
    goes last."""
    cost = {s.layer: s.kl for s in scores}
    by_cost = sorted(cost, key=lambda i: (cost[i], i))
    globals_ = [i for i, window in enumerate(windows or []) if window is None]
    if windows is None or not globals_ or len(globals_) == len(windows):
        return sorted(by_cost[:k]), []
    median = statistics.median(cost.values())
    demoted = [i for i in by_cost if i in globals_ and cost[i] > OUTLIER * median]
    order = [i for i in by_cost if i in globals_ and i not in demoted] + [i for i in by_cost if i not in globals_] + demoted
    return sorted(order[:k]), demoted


def ranking_table(scores: list[LayerScore], chosen: list[int], windows: list[int | None] | None = None) -> Table:
    """The layers from cheapest to costliest, in 80 columns."""
    sliding = windows is not None and any(w is not None for w in windows) and not all(w is not None for w in windows)
    table = Table(title="KL on answer tokens, each layer converted alone")
    for name in ("rank", "layer", *(("attention",) if sliding else ()), "KL fitted", "KL unfitted", "layer loss", "convert"):
        table.add_column(name, justify="left" if name == "attention" else "right")
    for rank, s in enumerate(sorted(scores, key=lambda s: (s.kl, s.layer)), 1):
        kind = ("global" if windows[s.layer] is None else f"window {windows[s.layer]}",) if sliding else ()
        table.add_row(str(rank), str(s.layer), *kind, f"{s.kl:.4g}", f"{s.kl_unfitted:.4g}", f"{s.layer_loss:.4g}",
                      "yes" if s.layer in chosen else "")
    return table


def bar_chart(scores: list[LayerScore], chosen: list[int], path: Path, title: str) -> None:
    """Each layer's fitted and unfitted KL as bars, the chosen layers marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import write_atomic

    layers = [s.layer for s in scores]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 3.6))
    width = 0.4
    ax.bar([i - width / 2 for i in layers], [s.kl_unfitted for s in scores], width, color="#c9c9c9")
    ax.bar([i + width / 2 for i in layers], [s.kl for s in scores], width,
           color=["#1f77b4" if s.layer in chosen else "#ff7f0e" for s in scores])
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("KL on answer tokens (log)")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#c9c9c9", label="mixer as initialised"), Patch(color="#1f77b4", label="fitted, converted"),
                       Patch(color="#ff7f0e", label="fitted, kept as attention")], fontsize=8)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def scores_block(scores: list[LayerScore], calibration: Calibration, seed: int, demoted: list[int]) -> dict:
    """What the hybrid's `matvlm` config block records about the scoring."""
    return {"placement_scores": [asdict(s) for s in scores], "placement_calibration": {
        "source": calibration.source, "records": calibration.records, "seed": seed, "fit_steps": FIT_STEPS,
        "fit_lr": FIT_LR, "score": "next-token KL(teacher || hybrid) on answer tokens, one layer converted and fitted"},
        **({"placement_demoted_globals": demoted} if demoted else {})}


def scores_json(scores: list[LayerScore]) -> str:
    return json.dumps([asdict(s) for s in scores], indent=1)
