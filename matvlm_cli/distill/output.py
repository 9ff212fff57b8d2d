"""The run's output folder: checked before any work, locked while the run writes to it, its old contents
replaced only once models and data are ready, and removed again after a failure that left nothing
to resume from."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import yaml

from ..atomic import OUTPUT_MARK, check_output_dir, lock_directory, mark_output, remove_contents
from ..errors import MatvlmError
from ..recipes import DistillRecipe
from .checkpoint import checkpoints_in

# What a run writes in output.dir (its mark lists them, so output.overwrite replaces only these).
RUN_ENTRIES = ("recipe.yaml", "log.jsonl", "summary.json", "checkpoints", "final", "tensorboard")


class OutputFolder:
    def __init__(self, recipe: DistillRecipe):
        self.recipe = recipe
        self.path = Path(recipe.output.dir)
        self.created, self.lock = False, None

    def check_kind(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise MatvlmError(f"output.dir: {self.path} exists and is not a directory")

    def claim(self, resume: Path | None, teacher_dir: Path) -> bool:
        """Check output.dir before any work, then create it and lock it: one run writes to it at a time (a
        second would interleave log.jsonl and race for `final`). True when its old contents are to be replaced:
        output.overwrite, on a folder matvlm wrote, that holds none of the run's inputs."""
        r, out = self.recipe, self.path
        if r.output.resume == "auto" and resume is None and out.is_dir() and any(p.name != OUTPUT_MARK for p in out.iterdir()):
            raise MatvlmError(
                f"--resume: {out} has no checkpoint to resume from (output.save_every is {r.output.save_every}); "
                "run without --resume to start again (output.overwrite: true replaces it), or choose another output.dir"
            )
        occupied = out.is_dir() and any(out.iterdir())
        fresh = r.output.resume is None
        if fresh and occupied and not r.output.overwrite:
            raise MatvlmError(f"output.dir: {out} already exists (set output.resume: auto to continue, or output.overwrite: true)")
        replace = fresh and occupied
        models = (teacher_dir, *([r.student.path] if r.student.path else []))
        data = tuple(path for d in r.data for path in (d.json, d.image_root))
        check_output_dir(out, "output.dir", exists_ok=not replace, overwrite=replace, inputs=models, data_inputs=data)
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MatvlmError(f"output.dir: {out} cannot be made: {err.strerror or err}") from None
        self.lock = lock_directory(out, "output.dir")
        self.created = created  # only once it is ours: a run refused the lock removes nothing
        return replace

    def start(self, replace: bool) -> None:
        """The run is ready: the old contents go (when `replace`), and the folder is marked as the run's,
        with its recipe."""
        if replace:  # only now that models and data are ready: a run that fails before this keeps the old one
            remove_contents(self.path)
        mark_output(self.path, RUN_ENTRIES)
        (self.path / "recipe.yaml").write_text(yaml.safe_dump(asdict(self.recipe), sort_keys=False))

    def release(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def discard_unfinished(self) -> None:
        """After a failure: an output directory this run created and left with nothing to resume from
        (no checkpoint, no final hybrid) is removed, so the same command can simply be run again."""
        if self.created and self.path.is_dir() and not checkpoints_in(self.path) and not (self.path / "final").exists():
            shutil.rmtree(self.path, ignore_errors=True)
