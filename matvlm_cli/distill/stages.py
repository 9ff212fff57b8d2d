"""The run's stages laid end to end: which stage an optimizer step belongs to, what it trains with, and
its learning-rate schedule.

A stage is a `recipes.DistillStage`. A recipe without `stages` runs as one stage: the layers the
student converts, over all the run's steps, with the recipe's own settings.
"""

from __future__ import annotations

import dataclasses
import math

from ..recipes import DistillRecipe, DistillStage, LossWeights, OptimizerSettings, stage_settings


def lr_factor(schedule: str, step: int, total: int, warmup: int, decay: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    decay_start = total - decay  # warmup-stable-decay
    return 1.0 if step < decay_start else max(0.0, (total - step) / max(1, decay))


class StagePlan:
    """`stages[i]` runs optimizer steps [starts[i], starts[i] + stages[i].max_steps) with `trainable(i)`,
    `losses(i)` and `optimizer(i)`: the recipe's settings with the stage's changes."""

    def __init__(self, recipe: DistillRecipe, layers: list[int], total_steps: int):
        self.base_lr = recipe.optimizer.lr
        if recipe.stages:
            self.stages = [dataclasses.replace(stage, layers=list(stage.layers)) for stage in recipe.stages]
            self.settings = [stage_settings(recipe, stage) for stage in recipe.stages]
        else:
            self.stages = [DistillStage(list(layers), total_steps)]
            self.settings = [(recipe.trainable, recipe.losses, recipe.optimizer)]
        self.starts, start = [], 0
        for stage in self.stages:
            self.starts.append(start)
            start += stage.max_steps

    def __len__(self) -> int:
        return len(self.stages)

    def trainable(self, index: int) -> str:
        return self.settings[index][0]

    def losses(self, index: int) -> LossWeights:
        return self.settings[index][1]

    def optimizer(self, index: int) -> OptimizerSettings:
        return self.settings[index][2]

    def index(self, step: int) -> int:
        """The stage that optimizer step `step` (0-based) belongs to; past the end, the last."""
        return next((i for i, stage in enumerate(self.stages) if step < self.starts[i] + stage.max_steps), len(self.stages) - 1)

    def lr_factor(self, step: int) -> float:
        """Each stage runs its own schedule over its own steps, at its own lr (a factor of the optimizer's)."""
        index = self.index(step)
        o, stage = self.optimizer(index), self.stages[index]
        factor = lr_factor(o.schedule, step - self.starts[index], stage.max_steps, o.warmup_steps, o.decay_steps)
        return factor if o.lr == self.base_lr else factor * o.lr / self.base_lr

    def described(self) -> list[dict]:
        """The stages as the final hybrid's config records them."""
        return [{"layers": s.layers, "steps": s.max_steps, "trainable": self.trainable(i)} for i, s in enumerate(self.stages)]
