"""Sample scenes from the embedded world, each with a question the embedded teacher was trained to answer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..world.questions import existence_question, pope_prompt, textvqa_prompt, textvqa_question
from ..world.scenes import render, sample_scene

DESCRIBE = "Describe the image."


@dataclass(frozen=True)
class Sample:
    name: str
    image: Image.Image  # 64 x 64, the teacher's input size, as the world renders it
    question: str


def sample_scenes(count: int = 6) -> list[Sample]:
    """The same scenes on every call: descriptions, a reading question and an existence question."""
    rng = random.Random("matvlm-app/samples/v1")
    samples = []
    for i in range(count):
        kind = ("describe", "read", "describe", "exists")[i % 4]
        scene = sample_scene(rng, text=kind == "read")
        if kind == "read":
            question = textvqa_prompt(textvqa_question(scene, rng))
        elif kind == "exists":
            question = pope_prompt(existence_question(rng.choice(scene.objects).kind))
        else:
            question = DESCRIBE
        samples.append(Sample(f"scene-{i}", render(scene), question))
    return samples


def write_samples(folder: Path, samples: list[Sample]) -> list[Path]:
    """Each sample's picture as PNG in `folder` (the page shows files), in the order given."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in samples:
        path = folder / f"{sample.name}.png"
        sample.image.save(path)
        paths.append(path)
    return paths
