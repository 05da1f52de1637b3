"""A small built-in demo dataset: synthetic shapes (circle, square, triangle, cross) as an ImageFolder of PNGs.

Made on the fly with Pillow, so the quickstart needs no download. Each image has a random size, position, colour,
background and noise; the class is the shape.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "cross", "square", "triangle")


def _draw(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 96, 3))
    fg = tuple(int(v) for v in rng.integers(128, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.18, 0.35) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    noise = rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_demo_dataset(root: str | os.PathLike, per_class: int = 48, size: int = 64, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<shape>/*.png`` (``per_class`` training and ``per_class // 2`` validation images)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(1, per_class // 2))):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _draw(shape, size, rng).save(folder / f"{i:04d}.png")
    return root
