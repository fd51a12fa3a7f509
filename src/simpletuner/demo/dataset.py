"""A small procedural dataset: coloured shapes on coloured backgrounds, with captions.

Captions name what is drawn ("a red circle on a blue background"), so a model
can actually learn the pairing in a few hundred steps.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (96, 64), (64, 96))  # three aspect buckets


def _draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int],
          size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    radius = rng.randint(min(size) // 5, min(size) // 3)
    cx = rng.randint(radius, width - radius)
    cy = rng.randint(radius, height - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def write_dataset(directory: Path, count: int = 48, seed: int = 0) -> Path:
    """Write `count` PNGs with .txt captions into `directory` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        colour, background = rng.sample(names, 2)
        size = SIZES[(index // len(SHAPES)) % len(SIZES)]
        image = _draw(shape, COLOURS[colour], COLOURS[background], size, rng)
        stem = f"{index:04d}"
        image.save(directory / f"{stem}.png")
        (directory / f"{stem}.txt").write_text(f"a {colour} {shape} on a {background} background\n")
    return directory
