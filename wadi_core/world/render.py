"""Rendering of ShapesWorld scenes: RGB image, object mask and edge map (the condition maps).

Shapes are drawn with PIL at 4× supersampling and LANCZOS-downsampled, so edges are anti-aliased like
natural images rather than hard pixel steps.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .scenes import _REFERENCE_RESOLUTION, COLORS, Scene, ShapesObject

SUPERSAMPLING = 4
SQUARE_HALF_SIDE = 0.85  # × radius: squares, circles and triangles of one radius have similar areas
TRIANGLE_CIRCUMRADIUS = 1.15  # × radius
CROSS_ARM_HALF_WIDTH = 0.38  # × radius: the "cross" (a plus sign), a shape outside the grammar (DreamBooth's subject)


def shape_polygon(obj: ShapesObject, scale: float) -> list[tuple[float, float]] | None:
    """Polygon of a square, triangle or (off-grammar) cross in supersampled pixels (None for circles)."""
    cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
    if obj.shape == "square":
        h = SQUARE_HALF_SIDE * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        R = TRIANGLE_CIRCUMRADIUS * r  # pointing up, centroid at the object's centre
        return [(cx + R * math.cos(a), cy - R * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if obj.shape == "cross":
        a, w = r, CROSS_ARM_HALF_WIDTH * r
        outline = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w),
                   (-w, w), (-w, a)]
        return [(cx + x, cy + y) for x, y in outline]
    if obj.shape == "circle":
        return None
    raise ValueError(f"unknown shape {obj.shape!r}")


def _draw(draw: ImageDraw.ImageDraw, obj: ShapesObject, scale: float, fill) -> None:
    polygon = shape_polygon(obj, scale)
    if polygon is None:
        cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render_scene(scene: Scene, resolution: int = 32) -> np.ndarray:
    """RGB image (H, W, 3) uint8 on a black background."""
    big = resolution * SUPERSAMPLING
    scale = big / _REFERENCE_RESOLUTION
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, scale, COLORS[obj.color])
    return np.asarray(canvas.resize((resolution, resolution), Image.LANCZOS))


def render_mask(scene: Scene, resolution: int = 32) -> np.ndarray:
    """Binary object mask (H, W) uint8 in {0, 1}: a pixel is 1 when at least half of it is covered."""
    big = resolution * SUPERSAMPLING
    scale = big / _REFERENCE_RESOLUTION
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, scale, 255)
    coverage = np.asarray(canvas.resize((resolution, resolution), Image.BOX))
    return (coverage >= 128).astype(np.uint8)


def edge_map(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a binary mask (H, W): mask pixels with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    eroded = (
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    return (mask & (1 - eroded)).astype(np.uint8)
