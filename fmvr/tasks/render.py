"""Pixels of a scene record (deterministic from its seed)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fmvr.tasks.scene import COLOURS, SIZE, Scene, digit_scans


def render_scene(scene: Scene) -> Image.Image:
    """The 336x336 RGB image of a scene record (deterministic)."""
    rng = np.random.default_rng(scene.seed)
    img = Image.fromarray(_background(scene.background, rng))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.box, COLOURS[o.colour])
    if scene.digit_box is not None and scene.digit_index is not None:
        x0, y0, x1, y1 = scene.digit_box
        img.paste(_digit_card(scene.digit_index, x1 - x0), (x0, y0))
    return img


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    lo, hi = sorted(rng.integers(60, 200, size=2))
    tint = rng.integers(-15, 16, size=3)  # a faint colour cast, never a palette colour
    if kind == "gradient":
        ramp = (
            np.linspace(lo, hi + 40, SIZE)[None, :]
            if rng.random() < 0.5
            else np.linspace(lo, hi + 40, SIZE)[:, None]
        )
        base = np.broadcast_to(ramp, (SIZE, SIZE))  # [H, W]
    elif kind == "stripes":
        period = int(rng.integers(12, 40))
        base = np.where((np.arange(SIZE)[:, None] + np.arange(SIZE)[None, :]) // period % 2, lo, hi)  # [H, W]
    elif kind == "grey":  # the detail variant: plain, so small objects are not lost in texture
        base = rng.normal((lo + hi) / 2, 4, size=(SIZE, SIZE))  # [H, W]
    else:
        base = rng.normal((lo + hi) / 2, 18, size=(SIZE, SIZE))  # [H, W]
    rgb = base[..., None] + tint[None, None, :]  # [H, W, 3]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((x0 + s * 0.1, y0 + s * 0.1, x1 - s * 0.1, y1 - s * 0.1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w = s * 0.16
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(4, s // 7))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _digit_card(index: int, size: int) -> Image.Image:
    """A white card with the 8x8 scan upscaled (nearest) and drawn dark: [size, size] RGB."""
    images, _ = digit_scans()
    ink = images[index] / 16.0  # [8, 8] in 0..1
    cell = (size - 4) // 8
    up = np.kron(ink, np.ones((cell, cell)))  # [8*cell, 8*cell]
    card = np.full((size, size), 255.0)
    pad = (size - up.shape[0]) // 2
    card[pad : pad + up.shape[0], pad : pad + up.shape[1]] = 255.0 * (1.0 - up)
    return Image.fromarray(np.repeat(card[..., None], 3, axis=2).astype(np.uint8))  # [size, size, 3]
