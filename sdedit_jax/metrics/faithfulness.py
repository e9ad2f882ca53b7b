"""Faithfulness of an edited image to its guide: L2, PSNR and SSIM, per example.

SDEdit (Meng et al., 2022) measures faithfulness as the "L2 distance" between the
guide (e.g. a stroke painting) and the output. We read that as the Euclidean norm
of the pixel difference of images in ``[0, 1]``: the square root of the squared
error summed over all pixels and channels of one image. It scales with image size
(sqrt of H*W*C), so compare it only at a fixed resolution; ``mse``/``psnr`` are the
size-free variants.

Masks follow the SDEdit convention: 1 marks the editable region, 0 the region that
must be kept. ``mask`` may be ``[B, H, W]``, ``[B, H, W, 1]`` or ``[B, H, W, C]``
and may hold soft weights in ``[0, 1]``. Outside-the-mask scores use ``1 - mask``.
A mean over an empty region (masked MSE/PSNR) is undefined and returns NaN rather
than a made-up number; the masked L2 of an empty region is the empty sum, 0.

All functions take ``[B, H, W, C]`` arrays in ``[0, 1]``, return ``[B]`` arrays,
are pure ``jnp`` and jit-friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# SSIM constants of Wang et al. (2004) for a data range of 1.
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11-tap window: the Gaussian truncated at 3.5 sigma, as in scikit-image.


def _check_pair(x: jax.Array, y: jax.Array) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two [B, H, W, C] images of equal shape, got {x.shape}, {y.shape}"
        )


def _mask_weights(mask: jax.Array, x: jax.Array) -> jax.Array:
    """Brings a mask to ``[B, H, W, C]`` (explicitly: implicit rank promotion is off)."""
    if mask.ndim == 3:
        mask = mask[..., None]
    if mask.ndim != 4 or mask.shape[:3] != x.shape[:3] or mask.shape[3] not in (1, x.shape[3]):
        raise ValueError(f"mask of shape {mask.shape} does not fit images of shape {x.shape}")
    return jnp.broadcast_to(mask.astype(jnp.float32), x.shape)


def _squared_error(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32))


def _psnr_from_mse(mse_value: jax.Array, max_value: float) -> jax.Array:
    # Identical images have mse 0: report +inf explicitly instead of a division warning.
    safe = jnp.where(mse_value > 0, mse_value, 1.0)
    return jnp.where(mse_value > 0, 10.0 * jnp.log10(max_value**2 / safe), jnp.inf)


def l2_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """SDEdit's L2: ``sqrt(sum over H, W, C of (x - y)^2)`` per example."""
    _check_pair(x, y)
    return jnp.sqrt(jnp.sum(_squared_error(x, y), axis=(1, 2, 3)))


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error over pixels and channels, per example."""
    _check_pair(x, y)
    return jnp.mean(_squared_error(x, y), axis=(1, 2, 3))


def psnr(x: jax.Array, y: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per example; ``inf`` for identical images."""
    return _psnr_from_mse(mse(x, y), max_value)


def masked_l2_distance(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """L2 restricted to the mask: ``sqrt(sum of mask * (x - y)^2)`` (an empty sum is 0)."""
    _check_pair(x, y)
    weights = _mask_weights(mask, x)
    return jnp.sqrt(jnp.sum(weights * _squared_error(x, y), axis=(1, 2, 3)))


def masked_mse(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Mask-weighted mean squared error per example; NaN for an empty mask."""
    _check_pair(x, y)
    weights = _mask_weights(mask, x)
    total = jnp.sum(weights * _squared_error(x, y), axis=(1, 2, 3))
    area = jnp.sum(weights, axis=(1, 2, 3))
    return jnp.where(area > 0, total / jnp.where(area > 0, area, 1.0), jnp.nan)


def masked_psnr(x: jax.Array, y: jax.Array, mask: jax.Array, max_value: float = 1.0) -> jax.Array:
    """PSNR over the masked region; ``inf`` if identical there, NaN for an empty mask."""
    err = masked_mse(x, y, mask)
    return jnp.where(jnp.isnan(err), jnp.nan, _psnr_from_mse(err, max_value))


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur_valid(images: jax.Array) -> jax.Array:
    """Separable Gaussian filter per channel, keeping only fully covered pixels."""
    channels = images.shape[-1]
    taps = jnp.asarray(_gaussian_window())
    size = taps.shape[0]
    dims = ("NHWC", "HWIO", "NHWC")
    vertical = jnp.tile(taps.reshape(size, 1, 1, 1), (1, 1, 1, channels))
    horizontal = jnp.tile(taps.reshape(1, size, 1, 1), (1, 1, 1, channels))
    out = jax.lax.conv_general_dilated(
        images, vertical, (1, 1), "VALID", dimension_numbers=dims, feature_group_count=channels
    )
    return jax.lax.conv_general_dilated(
        out, horizontal, (1, 1), "VALID", dimension_numbers=dims, feature_group_count=channels
    )


def ssim(x: jax.Array, y: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Mean SSIM per example (Gaussian window, sigma 1.5, K1=0.01, K2=0.03).

    Matches ``skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, channel_axis=-1)``: statistics are taken only where
    the 11x11 window fits, and the SSIM map is averaged over pixels and channels.
    """
    _check_pair(x, y)
    if min(x.shape[1:3]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got shape {x.shape}")
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    c1 = (SSIM_K1 * max_value) ** 2
    c2 = (SSIM_K2 * max_value) ** 2
    mu_x, mu_y = _blur_valid(x), _blur_valid(y)
    var_x = _blur_valid(x * x) - mu_x * mu_x
    var_y = _blur_valid(y * y) - mu_y * mu_y
    cov_xy = _blur_valid(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return jnp.mean(numerator / denominator, axis=(1, 2, 3))


def faithfulness_scores(
    output: jax.Array, guide: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """All faithfulness scores of ``output`` against ``guide``, each ``[B]``.

    With a mask, adds L2/PSNR inside the editable region (``*_inside``) and in the
    region meant to be preserved (``*_outside``).
    """
    scores = {
        "l2": l2_distance(output, guide),
        "mse": mse(output, guide),
        "psnr": psnr(output, guide),
        "ssim": ssim(output, guide),
    }
    if mask is not None:
        keep = 1.0 - mask.astype(jnp.float32)
        scores |= {
            "l2_inside": masked_l2_distance(output, guide, mask),
            "l2_outside": masked_l2_distance(output, guide, keep),
            "psnr_inside": masked_psnr(output, guide, mask),
            "psnr_outside": masked_psnr(output, guide, keep),
        }
    return scores
