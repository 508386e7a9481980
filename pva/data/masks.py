"""Inpainting masks: seeded free-form brush strokes and landmark region boxes (METHOD 6, 8)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pva.faces import MASK_REGIONS

EVAL_MASKS = ("lowerface", "eyebrow", "wholeface", "random")
"""The four evaluation masks of METHOD section 8."""


def brush_stroke_mask(size: int, rng: random.Random, max_strokes: int = 4) -> np.ndarray:
    """Free-form brush strokes (irregular polylines of varying width): (size, size) bool."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, max_strokes)):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        width = int(rng.uniform(0.03, 0.10) * size) + 1
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(rng.randint(4, 10)):
            angle += rng.uniform(-math.pi / 3, math.pi / 3)
            length = rng.uniform(0.05, 0.2) * size
            nx = min(max(x + length * math.cos(angle), 0), size - 1)
            ny = min(max(y + length * math.sin(angle), 0), size - 1)
            draw.line([(x, y), (nx, ny)], fill=255, width=width)
            r = width / 2
            draw.ellipse([nx - r, ny - r, nx + r, ny + r], fill=255)
            x, y = nx, ny
    return np.asarray(img) > 0


def box_mask(size: int, box: Sequence[int]) -> np.ndarray:
    """(size, size) bool, True inside ``[x0, y0, x1, y1)``."""
    mask = np.zeros((size, size), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


def flip_box(box: Sequence[int], size: int) -> list[int]:
    """A box under a horizontal flip of a ``size``-wide image."""
    x0, y0, x1, y1 = box
    return [size - x1, y0, size - x0, y1]


def training_mask(
    size: int, boxes: Mapping[str, Sequence[int]], rng: random.Random
) -> tuple[np.ndarray, str]:
    """Free-form strokes united with one box from lowerface / eyebrow / wholeface (METHOD 6).

    Returns:
        ``(mask (size, size) bool, region name)``.
    """
    region = rng.choice(MASK_REGIONS)
    return brush_stroke_mask(size, rng) | box_mask(size, boxes[region]), region


def eval_mask(
    kind: str, size: int, boxes: Mapping[str, Sequence[int]], rng: random.Random
) -> np.ndarray:
    """An evaluation mask (METHOD 8): a region box, or ``random`` = strokes + one region box."""
    if kind == "random":
        return training_mask(size, boxes, rng)[0]
    if kind not in MASK_REGIONS:
        raise ValueError(f"mask kind must be one of {EVAL_MASKS}, got {kind!r}")
    return box_mask(size, boxes[kind])
