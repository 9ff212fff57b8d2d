"""Procedural scenes: the ground truth and the pictures of the synthetic visual-QA world.

A scene is a 3x3 grid of cells holding 1-4 coloured shapes, one per cell, so that every object has an
unambiguous named position. A scene may also carry a word or a number written across the bottom row
(objects then stay in the top two rows), which reading questions ask about.

Objects are not independent, because POPE's negative sampling only means something in a world with
structure: kinds (colour + shape) follow a Zipf popularity, and each scene draws most of its objects
from one of a few fixed groups of kinds. `popular` negatives then differ from `random` ones (frequent
kinds) and `adversarial` ones differ again (kinds that usually appear beside those present). The
structure is fixed for the world; a seed only chooses scenes from it.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 80, 230), "yellow": (240, 210, 20),
    "purple": (140, 50, 190), "orange": (250, 130, 20), "pink": (250, 120, 190),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# Short words that take a plain "s" plural, so answer variants stay regular; none is a shape name.
WORDS = (
    "cat", "dog", "sun", "moon", "tree", "bird", "car", "book", "door", "cake", "road", "ship", "lamp", "bell",
    "rose", "king", "rock", "ball", "boat", "shoe", "hat", "cup", "pen", "key", "map", "egg", "bag", "cow",
    "frog", "kite",
)
KINDS = tuple((color, shape) for color in COLORS for shape in SHAPES)
MAX_OBJECTS = 4
TEXT_PROBABILITY = 0.4
UPPERCASE_PROBABILITY = 0.3
GROUP_AFFINITY = 0.8  # chance that an object comes from the scene's group rather than the whole world
N_GROUPS = 7


def _world_structure() -> tuple[dict[tuple[str, str], float], tuple[tuple[tuple[str, str], ...], ...]]:
    """Fixed Zipf popularity per kind and a partition of the kinds into co-occurrence groups."""
    rng = random.Random("matvlm-world/structure/v1")
    ranked = rng.sample(KINDS, len(KINDS))
    popularity = {kind: 1.0 / (rank + 1) for rank, kind in enumerate(ranked)}
    shuffled = rng.sample(KINDS, len(KINDS))
    return popularity, tuple(tuple(shuffled[i::N_GROUPS]) for i in range(N_GROUPS))


POPULARITY, GROUPS = _world_structure()


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    cell: int  # 0..8, row-major in the 3x3 grid
    jitter: tuple[int, int]  # (-1..1, -1..1): a small nudge within the cell, so pictures vary

    @property
    def kind(self) -> tuple[str, str]:
        return self.color, self.shape

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # sorted by cell (reading order)
    background: str
    text: str | None = None  # exactly as rendered: a word (maybe upper case) or a number 0-99

    @property
    def kinds(self) -> tuple[tuple[str, str], ...]:
        return tuple(obj.kind for obj in self.objects)


def sample_scene(rng: random.Random, text: bool | None = None) -> Scene:
    """Draw one scene; `text` forces a word/number on or off (None: on with TEXT_PROBABILITY)."""
    if text is None:
        text = rng.random() < TEXT_PROBABILITY
    cells = rng.sample(range(6 if text else 9), rng.randint(1, MAX_OBJECTS))
    objects = [
        SceneObject(color, shape, rng.choice(SIZES), cell, (rng.randint(-1, 1), rng.randint(-1, 1)))
        for (color, shape), cell in zip(_sample_kinds(rng, len(cells)), cells, strict=True)
    ]
    background = rng.choice(list(BACKGROUNDS))
    return Scene(tuple(sorted(objects, key=lambda obj: obj.cell)), background, _sample_text(rng) if text else None)


def _sample_kinds(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct kinds, mostly from one group, each weighted by popularity."""
    group = rng.choice(GROUPS)
    chosen: list[tuple[str, str]] = []
    while len(chosen) < n:
        pool = group if rng.random() < GROUP_AFFINITY else KINDS
        candidates = [kind for kind in pool if kind not in chosen]
        chosen.append(rng.choices(candidates, weights=[POPULARITY[kind] for kind in candidates])[0])
    return chosen


def _sample_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return str(rng.randint(0, 99))
    word = rng.choice(WORDS)
    return word.upper() if rng.random() < UPPERCASE_PROBABILITY else word


@dataclass(frozen=True)
class WorldStatistics:
    """Kind frequencies and ordered-pair co-occurrence counts over a large fixed sample of scenes."""

    frequency: Counter
    cooccurrence: Counter


@functools.cache
def world_statistics(n_scenes: int = 5000) -> WorldStatistics:
    """The statistics POPE's `popular` and `adversarial` negatives rank by.

    POPE counts them over its own images; we count them over a fixed sample of the world instead,
    so rankings are stable and do not depend on how many benchmark rows are asked for.
    """
    rng = random.Random("matvlm-world/statistics/v1")
    frequency: Counter = Counter()
    cooccurrence: Counter = Counter()
    for _ in range(n_scenes):
        kinds = sample_scene(rng).kinds
        frequency.update(kinds)
        cooccurrence.update(itertools.permutations(kinds, 2))
    return WorldStatistics(frequency, cooccurrence)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as a size x size RGB picture: big flat shapes and big text, for a patch-8 encoder."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        large = obj.size == "large"
        radius = cell * (0.45 if large else 0.27)
        step = cell * (0.04 if large else 0.14)
        center = ((col + 0.5) * cell + obj.jitter[0] * step, (row + 0.5) * cell + obj.jitter[1] * step)
        _draw_shape(draw, obj.shape, center, radius, COLORS[obj.color])
    if scene.text is not None:
        ink = (255, 255, 255) if scene.background == "black" else (0, 0, 0)
        draw.text((size / 2, 2.5 * cell), scene.text, fill=ink, font=_font(round(size * 0.28)), anchor="mm")
    return image


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], r: float, fill) -> None:
    x, y = center
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    else:
        radii = {"triangle": (r,) * 3, "diamond": (r,) * 4, "star": (r, r * 0.45) * 5}[shape]
        draw.polygon(_polygon(x, y, radii), fill=fill)


def _polygon(x: float, y: float, radii: tuple[float, ...]) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced, the first pointing straight up."""
    n = len(radii)
    return [
        (x + rad * math.cos(-math.pi / 2 + 2 * math.pi * i / n), y + rad * math.sin(-math.pi / 2 + 2 * math.pi * i / n))
        for i, rad in enumerate(radii)
    ]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
