"""FIR (finite impulse response) 2x up/down sampling of NHWC images (StyleGAN2, NCSN++).

NCSN++ resamples with a normalised separable low-pass filter (``(1, 3, 3, 1)`` by
default) instead of nearest/average pooling, which keeps the spatial spectrum
clean. The filter is separable, so each axis is filtered on its own: a short
sum of shifted slices, which XLA fuses, instead of a depthwise convolution.
Border pixels see zeros outside the image, as in the reference ``upfirdn2d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def normalized_taps(kernel: Sequence[float], gain: float) -> np.ndarray:
    """1-D taps whose outer product is ``outer(k, k) / sum(outer(k, k)) * gain``."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 1 or k.size < 1 or k.sum() == 0:
        raise ValueError(f"fir_kernel must be a 1-D kernel with nonzero sum, got {kernel}")
    return k / k.sum() * np.sqrt(gain)


def _fir_axis(x: Array, taps: np.ndarray, axis: int, pad: tuple[int, int], step: int) -> Array:
    """Zero-pads ``axis`` by ``pad`` (negative crops), convolves with ``taps`` (flipped: a
    true convolution), and keeps every ``step``-th output."""
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (pad[0], pad[1], 0)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    n_out = (xp.shape[axis] - taps.size) // step + 1
    flipped = taps[::-1]
    out = None
    for m, tap in enumerate(flipped):
        if tap == 0:
            continue
        sl = jax.lax.slice_in_dim(xp, m, m + step * (n_out - 1) + 1, step, axis)
        term = sl * jnp.asarray(tap, x.dtype)
        out = term if out is None else out + term
    return out


def _zero_stuff(x: Array, axis: int, factor: int) -> Array:
    """Inserts ``factor - 1`` zeros after every sample along ``axis``."""
    zeros = [jnp.zeros_like(x)] * (factor - 1)
    stacked = jnp.stack([x, *zeros], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] *= factor
    return stacked.reshape(shape)


def upsample_2d(x: Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """``[B,H,W,C] -> [B,H*f,W*f,C]``: zero insertion then the FIR filter (gain ``f**2``)."""
    taps = normalized_taps(kernel, factor**2)
    p = taps.size - factor
    pad = ((p + 1) // 2 + factor - 1, p // 2)
    for axis in (1, 2):
        x = _fir_axis(_zero_stuff(x, axis, factor), taps, axis, pad, 1)
    return x


def downsample_2d(x: Array, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
    """``[B,H,W,C] -> [B,H/f,W/f,C]``: the FIR filter (gain 1), then every ``f``-th pixel."""
    taps = normalized_taps(kernel, 1.0)
    p = taps.size - factor
    pad = ((p + 1) // 2, p // 2)
    for axis in (1, 2):
        x = _fir_axis(x, taps, axis, pad, factor)
    return x
