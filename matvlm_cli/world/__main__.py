"""`python -m matvlm_cli.world --output DIR [--seed 0] [--train-size N ...]`: write a world, with progress."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .writers import generate_world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m matvlm_cli.world", description=__doc__)
    parser.add_argument("--output", type=Path, required=True, help="folder to create (written atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=20_000, help="training conversations (one image each)")
    parser.add_argument("--pope-per-category", type=int, default=100, help="even; rows per POPE category")
    parser.add_argument("--mmmu-size", type=int, default=150)
    parser.add_argument("--textvqa-size", type=int, default=150)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")
    if args.pope_per_category % 2:
        parser.error("--pope-per-category must be even (each image gets one yes and one no question)")

    console = Console()
    start = time.perf_counter()
    columns = (TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        paths = generate_world(
            args.output, seed=args.seed, train_size=args.train_size, pope_per_category=args.pope_per_category,
            mmmu_size=args.mmmu_size, textvqa_size=args.textvqa_size, image_size=args.image_size,
            overwrite=args.overwrite, on_progress=report,
        )
    console.print(f"wrote {paths.root} in {time.perf_counter() - start:.1f}s: train/, pope/, mmmu/, textvqa/")


if __name__ == "__main__":
    main()
