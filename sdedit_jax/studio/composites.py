"""The page's compositing, run by the code of ``python -m sdedit_jax.composite``.

The page sends the guide (target), the second image (source), the box, where it goes
and its scale; :func:`composite` decodes both with the command's readers and pastes
with its :func:`~sdedit_jax.data.compositing.paste`, so the result is the command's.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import numpy as np
from PIL import Image

from sdedit_jax.data import compositing


def _ints(value: Any, count: int, field: str) -> tuple[int, ...]:
    if not (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{field}: expected {count} integers, got {value!r}")
    return tuple(value)


def _read_rgb(data: bytes, field: str) -> np.ndarray:
    """``data`` decoded by the command's own reader (it reads files, so via a temp file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, field)
        with open(path, "wb") as f:
            f.write(data)
        try:
            return compositing.read_rgb(path, field)
        except compositing.CompositeError as e:
            raise ValueError(str(e).replace(path, "upload")) from None


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def composite(
    target_png: bytes, source_png: bytes, box: Any, at: Any, scale: Any, dilate: Any
) -> tuple[bytes, bytes]:
    """The composite guide and its mask (255 = the pasted region, dilated), as PNGs."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a number, got {scale!r}")
    if isinstance(dilate, bool) or not isinstance(dilate, int):
        raise ValueError(f"dilate: expected an integer, got {dilate!r}")
    target = _read_rgb(target_png, "target")
    source = _read_rgb(source_png, "source")
    try:
        region = compositing.box_region(source.shape, _ints(box, 4, "box"))
        guide, mask = compositing.paste(
            source, region, target, _ints(at, 2, "at"), float(scale), dilate
        )
    except compositing.CompositeError as e:
        raise ValueError(str(e).removeprefix("--")) from None
    return _png(guide), _png(mask.astype(np.uint8) * 255)
