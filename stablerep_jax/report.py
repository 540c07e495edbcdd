"""Pictures and pages for people: a loss-curve PNG (PIL only, no plotting library) and the
demo's markdown report."""
from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image, ImageDraw

from stablerep_jax import fileio

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def plot_curves(path: str, curves: dict[str, Sequence[tuple[float, float]]], title: str,
                x_label: str = "step", y_label: str = "loss", size=(720, 420)) -> str:
    """Draws named (x, y) series with axes, ticks and a legend; writes a PNG atomically."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [(x, y) for series in curves.values() for x, y in series if math.isfinite(y)]
    if not points:
        raise ValueError(f"plot_curves({path!r}): no finite points to draw")
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    x_max = x_max if x_max > x_min else x_min + 1
    pad = 0.05 * (y_max - y_min or 1.0)
    y_min, y_max = y_min - pad, y_max + pad

    def to_px(x, y):
        px = left + (x - x_min) / (x_max - x_min) * (width - left - right)
        py = top + (y_max - y) / (y_max - y_min) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        yv = y_min + (y_max - y_min) * i / 4
        _, py = to_px(x_min, yv)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{yv:.3g}", fill="black")
        xv = x_min + (x_max - x_min) * i / 4
        px, _ = to_px(xv, y_min)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{xv:.0f}", fill="black")
    draw.text((width // 2 - 20, height - 18), x_label, fill="black")
    draw.text((4, 8), f"{title}   ({y_label})", fill="black")
    for i, (name, series) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        xy = [to_px(x, y) for x, y in series if math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        draw.rectangle([width - right - 170, top + 10 + 16 * i, width - right - 158,
                        top + 20 + 16 * i], fill=colour)
        draw.text((width - right - 152, top + 8 + 16 * i), name, fill="black")
    png = io.BytesIO()
    image.save(png, format="PNG")
    return fileio.write_bytes_atomic(path, png.getvalue())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
