"""Compositing guides: paste a region of one image into another (SDEdit's third task).

SDEdit edits a composite (a region of a source image pasted into a target)
inside the pasted region only. :func:`paste` builds such a guide and its mask
from a user's own images; :func:`write_guide` writes it in the job's folder
layout (``<out>/<name>.png`` and ``<out>/masks/<name>.png``, white = editable;
see :mod:`sdedit_jax.data.guide_inputs`). The command line is
:mod:`sdedit_jax.composite`.

The region is a bool mask over the source (from a mask file or a pixel box).
Its bounding box is cut out, resized by ``scale`` and pasted with its top-left
corner at ``at = (x, y)`` of the target; the guide has the target's size. The
mask is the pasted region grown by ``dilate`` pixels (a disk), so the edit can
also blend the seam. Bad arguments raise :class:`CompositeError` with one line
naming the command-line argument and value.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image
from scipy import ndimage


class CompositeError(ValueError):
    """A bad argument or input file; the message names it."""


# Larger images are refused from their header, before decoding (as the job's input.max_pixels).
MAX_PIXELS = 1 << 26


def _open_image(path: str, field: str) -> Image.Image:
    too_large = f"{field} ({path}): its header declares over {MAX_PIXELS} pixels, the most allowed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CompositeError(too_large) from None
    except FileNotFoundError:
        raise CompositeError(f"{field} ({path}): file not found") from None
    except OSError as e:
        raise CompositeError(f"{field} ({path}): not a readable image ({e})") from None
    try:
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise CompositeError(f"{too_large} ({width}x{height})")
            image.load()
    except OSError as e:
        raise CompositeError(f"{field} ({path}): not a readable image ({e})") from None
    return image


def read_rgb(path: str, field: str) -> np.ndarray:
    """An 8-bit image file as uint8 ``[H, W, 3]`` (grayscale and palette are expanded)."""
    image = _open_image(path, field)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            raise CompositeError(
                f"{field} ({path}): has transparent pixels; give the region "
                "with --source_mask or --box on an opaque image"
            )
    if image.mode not in ("1", "L", "P", "RGB", "RGBA", "LA", "PA"):
        raise CompositeError(f"{field} ({path}): unsupported mode {image.mode} (need 8-bit)")
    return np.asarray(image.convert("RGB"))


def read_mask(path: str, field: str) -> np.ndarray:
    """A mask file as bool ``[H, W]``: pixels >= 128 (of 255) are the region."""
    image = _open_image(path, field)
    pixels = np.asarray(image.convert("RGB"))
    if np.any(pixels != pixels[..., :1]):
        raise CompositeError(f"{field} ({path}): colour mask; need grayscale (white = region)")
    return pixels[..., 0] >= 128


def box_region(shape: tuple[int, ...], box: tuple[int, int, int, int]) -> np.ndarray:
    """The bool ``[H, W]`` region of a pixel box ``(x0, y0, x1, y1)`` (ends exclusive)."""
    height, width = shape[:2]
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise CompositeError(
            f"--box: {x0},{y0},{x1},{y1} is empty or outside the source "
            f"({width}x{height}); need 0 <= x0 < x1 <= {width}, "
            f"0 <= y0 < y1 <= {height}"
        )
    region = np.zeros((height, width), bool)
    region[y0:y1, x0:x1] = True
    return region


def _bounding_box(region: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(region)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _resize(pixels: np.ndarray, size: tuple[int, int], upscale: bool) -> np.ndarray:
    """Resizes float ``[h, w, C]`` to ``size = (w, h)``: area average down, bicubic up."""
    method = Image.Resampling.BICUBIC if upscale else Image.Resampling.BOX
    channels = [
        Image.fromarray(pixels[..., c].astype(np.float32), mode="F").resize(size, method)
        for c in range(pixels.shape[-1])
    ]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def disk_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grows a bool mask by every pixel within Euclidean distance ``radius``.

    From the exact distance transform: time and memory of the image's size, for any radius.
    """
    if radius == 0 or not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask) <= radius


def paste(
    source: np.ndarray,
    region: np.ndarray,
    target: np.ndarray,
    at: tuple[int, int],
    scale: float = 1.0,
    dilate: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pastes ``source[region]`` into ``target``; returns ``(guide, mask)``.

    Args:
        source: uint8 ``[Hs, Ws, 3]``.
        region: bool ``[Hs, Ws]``, the pixels to paste.
        target: uint8 ``[Ht, Wt, 3]``.
        at: ``(x, y)`` of the target where the region's bounding box's
            top-left corner lands (after scaling).
        scale: resize factor of the region (area average below 1, bicubic above).
        dilate: pixels by which the written mask exceeds the pasted region.

    Returns:
        ``guide`` uint8 ``[Ht, Wt, 3]`` (the region's pixels over the target)
        and ``mask`` bool ``[Ht, Wt]`` (pasted region grown by ``dilate``).
    """
    if region.shape != source.shape[:2]:
        raise CompositeError(
            f"--source_mask: size {region.shape[1]}x{region.shape[0]} differs "
            f"from the source {source.shape[1]}x{source.shape[0]}"
        )
    if not region.any():
        raise CompositeError("--source_mask: the region is empty (no pixel >= 128)")
    if not (np.isfinite(scale) and scale > 0):
        raise CompositeError(f"--scale: must be a positive number, got {scale}")
    if dilate < 0:
        raise CompositeError(f"--dilate: must be >= 0 pixels, got {dilate}")
    x0, y0, x1, y1 = _bounding_box(region)
    width, height = round((x1 - x0) * scale), round((y1 - y0) * scale)
    if min(width, height) < 1:
        raise CompositeError(f"--scale: {scale} shrinks the {x1 - x0}x{y1 - y0} region to nothing")
    x, y = at
    target_h, target_w = target.shape[:2]
    # Checked before resizing: a huge --scale must not allocate the scaled region first.
    if not (0 <= x and 0 <= y and x + width <= target_w and y + height <= target_h):
        scaled = "" if scale == 1 else f" (--scale {scale:g})"
        raise CompositeError(
            f"--at: the {width}x{height} region at {x},{y} does not fit in the "
            f"target ({target_w}x{target_h}){scaled}"
        )
    patch = source[y0:y1, x0:x1].astype(np.float32)
    coverage = region[y0:y1, x0:x1, None].astype(np.float32)
    if (width, height) != (x1 - x0, y1 - y0):
        patch = _resize(patch, (width, height), scale > 1)
        coverage = _resize(coverage, (width, height), scale > 1)
    pasted = coverage[..., 0] >= 0.5
    guide = target.copy()
    window = guide[y : y + height, x : x + width]
    window[pasted] = np.clip(np.round(patch[pasted]), 0, 255).astype(np.uint8)
    mask = np.zeros((target_h, target_w), bool)
    mask[y : y + height, x : x + width] = pasted
    return guide, disk_dilate(mask, dilate)


def write_guide(out_dir: str, name: str, guide: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """Writes ``<out_dir>/<name>.png`` and ``<out_dir>/masks/<name>.png``; returns both paths."""
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise CompositeError(
            f"--name: {name!r} must be a plain file name (no folders, no leading dot)"
        )
    guide_path = os.path.join(out_dir, name + ".png")
    mask_path = os.path.join(out_dir, "masks", name + ".png")
    for folder in (out_dir, os.path.dirname(mask_path)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise CompositeError(f"--out: {folder} is a file; expected a folder (or a new path)")
    try:
        os.makedirs(os.path.dirname(mask_path), exist_ok=True)
        Image.fromarray(guide).save(guide_path)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    except OSError as e:
        raise CompositeError(f"--out ({out_dir}): cannot write: {e}") from None
    return guide_path, mask_path
