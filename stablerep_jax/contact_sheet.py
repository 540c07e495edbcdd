"""A PNG contact sheet: one row per caption, its caption text as a label, then its images.

People look at generated data before they train on it; a grid with the text beside the images
shows at a glance whether the images of a caption match it and differ from each other. Any list
of (caption, images) works: `generate` passes the first captions of its output, the demo its
own. Images may be uint8 arrays [H, W, 3], PIL images, or encoded JPEG/PNG bytes.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stablerep_jax import fileio

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def _to_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as img:
            return img.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"contact sheet: an image must be [H, W, C], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array[..., :3])


def _thumbnail(image, size: int) -> Image.Image:
    """The image scaled to fit a size x size box, centred on the background."""
    img = _to_image(image)
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.Resampling.BICUBIC if scale < 1 else Image.Resampling.NEAREST)
    box = Image.new("RGB", (size, size), BACKGROUND)
    box.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return box


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):     # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; long words are cut; overflow ends with an ellipsis."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if font.getlength(trial) <= width:
            current = trial
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _drawable(text: str, font) -> str:
    """The text, with characters the font cannot encode replaced (the bitmap font is latin-1)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def contact_sheet(rows: Sequence[tuple[str, Sequence]], *, thumb_size: int = 128,
                  label_width: int | None = None, padding: int = 4,
                  font_size: int = 12) -> Image.Image:
    """Builds the grid: row i is `rows[i] = (caption, images)`; rows may hold different counts."""
    if not rows:
        raise ValueError("contact sheet: no rows (give at least one (caption, images) pair)")
    if thumb_size < 8:
        raise ValueError(f"contact sheet: thumb_size={thumb_size} is too small (>= 8)")
    label_width = label_width or 2 * thumb_size
    columns = max(len(images) for _, images in rows)
    cell = thumb_size + padding
    width = padding + label_width + padding + columns * cell
    height = padding + len(rows) * cell
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(font_size)
    line_height = font_size + 3
    max_lines = max(1, thumb_size // line_height)
    for r, (caption, images) in enumerate(rows):
        top = padding + r * cell
        for i, line in enumerate(_wrap(_drawable(str(caption), font), font, label_width,
                                       max_lines)):
            draw.text((padding, top + i * line_height), line, fill=TEXT_COLOR, font=font)
        for c, image in enumerate(images):
            sheet.paste(_thumbnail(image, thumb_size), (2 * padding + label_width + c * cell, top))
    return sheet


def cell_box(row: int, column: int, *, thumb_size: int = 128, label_width: int | None = None,
             padding: int = 4) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image at (row, column) in a sheet built with these
    arguments: where callers (and tests) find a given image."""
    label_width = label_width or 2 * thumb_size
    cell = thumb_size + padding
    left = 2 * padding + label_width + column * cell
    top = padding + row * cell
    return left, top, left + thumb_size, top + thumb_size


def save_contact_sheet(path: str, rows: Sequence[tuple[str, Sequence]], **kwargs) -> str:
    """Builds the sheet and writes it as PNG atomically (local or any tf.io.gfile path, e.g.
    gs://; world-readable on local disks: a sheet is for people to see). Returns `path`."""
    png = io.BytesIO()
    contact_sheet(rows, **kwargs).save(png, format="PNG")
    return fileio.write_bytes_atomic(path, png.getvalue())
