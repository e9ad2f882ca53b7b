"""Contact sheets: a grid of images with labels, for people to look at results."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sdedit_jax.data.images import to_uint8

_LINE = 12  # pixels per line of the default font


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, max_lines: int) -> list[str]:
    """``text`` cut into lines of at most ``width`` pixels; beyond ``max_lines`` the
    middle gives way to an ellipsis, so both ends of a long id stay readable."""
    lines, line = [], ""
    for char in text:
        if line and draw.textlength(line + char) > width:
            lines.append(line)
            line = ""
        line += char
    lines.append(line)
    if len(lines) > max_lines:
        head = lines[: max_lines // 2]
        tail = lines[len(lines) - (max_lines - len(head)) :]
        tail[0] = "..." + tail[0][3:]
        lines = head + tail
    return lines


def contact_sheet(
    rows: list[list[np.ndarray]],
    column_labels: list[str],
    row_labels: list[str] | None = None,
    cell: int = 96,
    gap: int = 4,
) -> Image.Image:
    """Lays out ``rows`` of ``[H, W, C]`` images in ``[-1, 1]`` (None = empty cell).

    Images are upscaled with nearest-neighbour so 32 px pixels stay visible; a row
    label too wide for the margin wraps onto further lines (see :func:`_wrap`).
    """
    header, margin = 16, 0 if row_labels is None else 110
    n_cols = max(len(r) for r in rows)
    width = margin + n_cols * (cell + gap) + gap
    height = header + len(rows) * (cell + gap) + gap
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for col, label in enumerate(column_labels):
        draw.text((margin + gap + col * (cell + gap), 2), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        top = header + gap + r * (cell + gap)
        if row_labels is not None:
            lines = _wrap(draw, row_labels[r], margin - 8, max(1, cell // _LINE))
            first = top + (cell - _LINE * len(lines)) // 2
            for i, line in enumerate(lines):
                draw.text((4, first + i * _LINE), line, fill=(0, 0, 0))
        for c, image in enumerate(row):
            if image is None:
                continue
            pixels = to_uint8(image)
            if pixels.shape[-1] == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            tile = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (margin + gap + c * (cell + gap), top))
    return sheet
