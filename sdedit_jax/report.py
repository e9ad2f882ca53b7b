"""Contact sheets: a grid of images with labels, for people to look at results."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sdedit_jax.data.sinks import to_uint8


def contact_sheet(
    rows: list[list[np.ndarray]],
    column_labels: list[str],
    row_labels: list[str] | None = None,
    cell: int = 96,
    gap: int = 4,
) -> Image.Image:
    """Lays out ``rows`` of ``[H, W, C]`` images in ``[-1, 1]`` (None = empty cell).

    Images are upscaled with nearest-neighbour so 32 px pixels stay visible.
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
            draw.text((4, top + cell // 2 - 6), row_labels[r][:18], fill=(0, 0, 0))
        for c, image in enumerate(row):
            if image is None:
                continue
            pixels = to_uint8(image)
            if pixels.shape[-1] == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            tile = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (margin + gap + c * (cell + gap), top))
    return sheet
