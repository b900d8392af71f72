"""A demo sample the project draws itself: a shape on a gradient, one drag, and a mask around it."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .sample import DragSample


def demo_sample(width: int = 512, height: int = 384, seed: int = 0) -> DragSample:
    """A red ball on a blue-green gradient with a box; drag the ball's top to the right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([40 + 60 * xx / width, 90 + 80 * yy / height, 170 - 50 * xx / width], axis=-1)
    base += rng.normal(0, 4, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy, r = width * 0.4, height * 0.55, min(width, height) * 0.18
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(210, 50, 40), outline=(90, 20, 10), width=3)
    draw.rectangle([width * 0.72, height * 0.25, width * 0.9, height * 0.8], fill=(235, 220, 120))
    handle = (cx + r * 0.2, cy - r * 0.6)
    target = (cx + r * 0.9, cy - r * 0.6)
    mask = np.zeros((height, width), np.uint8)
    mask[int(cy - 1.6 * r):int(cy + 1.3 * r), int(cx - 1.3 * r):int(cx + 1.9 * r)] = 1
    return DragSample(np.asarray(img).copy(), [handle], [target], mask, "a red ball on a gradient", "demo")
