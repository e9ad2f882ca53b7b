"""SDXL's micro-conditioning: the ``time_ids`` its U-Net embeds beside the pooled text.

The base model was trained with each image's original size, its crop's top-left corner
and the target size (6 values, ``(height, width)`` pairs in pixels); the refiner with the
original size, the crop and an aesthetic score (5 values). Per example, so that a job's
rows each carry their own (by default the guide's size, no crop).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _pairs(name: str, value: Any, batch: int | None) -> np.ndarray:
    pairs = np.asarray(value, np.float64)
    pairs = pairs[None] if pairs.ndim == 1 else pairs
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.all(np.isfinite(pairs)):
        raise ValueError(f"{name}: expected (height, width) or [B, 2] finite values, got {value!r}")
    if batch is not None and pairs.shape[0] not in (1, batch):
        raise ValueError(f"{name}: {pairs.shape[0]} rows for a batch of {batch}")
    return pairs


def time_ids(
    original_size: Any,
    crops_coords_top_left: Any,
    target_size: Any = None,
    aesthetic_score: Any = None,
) -> np.ndarray:
    """``float32 [B, 6]`` (base: original size, crop, target size) or, with
    ``aesthetic_score`` instead of ``target_size``, ``[B, 5]`` (the refiner's), as
    diffusers' ``StableDiffusionXL*Pipeline._get_add_time_ids`` lays them out. Each
    argument is one value for the batch or one per example."""
    if (target_size is None) == (aesthetic_score is None):
        raise ValueError("time_ids: give target_size (base) or aesthetic_score (refiner)")
    original = _pairs("original_size", original_size, None)
    batch = original.shape[0]
    crop = _pairs("crops_coords_top_left", crops_coords_top_left, batch)
    batch = max(batch, crop.shape[0])
    if aesthetic_score is None:
        last = _pairs("target_size", target_size, batch)
    else:
        last = np.asarray(aesthetic_score, np.float64).reshape(-1, 1)
        if not np.all(np.isfinite(last)) or last.shape[0] not in (1, batch):
            raise ValueError(
                f"aesthetic_score: expected a finite value or [B], got {aesthetic_score!r}"
            )
    batch = max(batch, last.shape[0])
    parts = [np.broadcast_to(p, (batch, p.shape[1])) for p in (original, crop, last)]
    return np.concatenate(parts, axis=1).astype(np.float32)
