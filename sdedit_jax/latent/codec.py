"""A VAE as the edit's codec: guides to scaled latents and back, masks to latent cells.

:class:`VAECodec` is a pytree whose only array leaves are the VAE's weights, so the edit
program traces them (new weights of the same VAE reuse the program) and its options are
static. Latents are scaled by the VAE's ``scaling_factor`` as Stable Diffusion's
pipelines scale them (``z = mean * scaling_factor``); decoding divides it out again.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax import rng

POSTERIORS = ("mean", "sample")
MASK_DOWNSAMPLES = ("max_pool", "nearest")


def check_options(posterior: str, mask_downsample: str) -> None:
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior: must be one of {POSTERIORS}, got {posterior!r}")
    if mask_downsample not in MASK_DOWNSAMPLES:
        raise ValueError(
            f"mask_downsample: must be one of {MASK_DOWNSAMPLES}, got {mask_downsample!r}"
        )


def _static(**kwargs):
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VAECodec:
    """``encode(keys, x) -> z``, ``decode(z) -> x``, ``latent_mask(mask)`` of one VAE.

    Attributes:
        state: the VAE's weights (the pytree's leaves).
        graphdef: the VAE's graph (:class:`sdedit_jax.models.vae.AutoencoderKL`).
        scaling_factor: latents are ``posterior * scaling_factor``.
        factor: pixels per latent cell along each side (2 ** (levels - 1)).
        posterior: ``"mean"`` (diffusers' ``latent_dist.mean``) or ``"sample"``, a draw
            ``mean + std * noise`` from the example's own key.
        mask_downsample: ``"max_pool"`` (a latent cell is editable if any of its pixels
            is, so thin strokes survive) or ``"nearest"`` (diffusers' inpainting: the
            pixel mask binarised at 0.5, then each cell's top-left pixel).
    """

    state: nnx.State
    graphdef: nnx.GraphDef = _static()
    scaling_factor: float = _static()
    factor: int = _static()
    posterior: str = _static(default="mean")
    mask_downsample: str = _static(default="max_pool")

    def __post_init__(self):
        check_options(self.posterior, self.mask_downsample)

    def encode(self, keys: jax.Array | None, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` images in [-1, 1] to ``[B, H/f, W/f, c]`` scaled latents."""
        mean, logvar = nnx.merge(self.graphdef, self.state).encode(x)
        if self.posterior == "sample":
            mean = mean + jnp.exp(0.5 * logvar) * rng.example_noise(keys, mean)
        return mean * self.scaling_factor

    def decode(self, z: jax.Array) -> jax.Array:
        """Scaled latents to images (about [-1, 1], not clipped)."""
        return nnx.merge(self.graphdef, self.state).decode(z * (1.0 / self.scaling_factor))

    def latent_mask(self, mask: jax.Array) -> jax.Array:
        """A pixel mask ``[B, H, W, 1 or C]`` (1 = editable) as ``[B, H/f, W/f, 1]``."""
        f = self.factor
        mask = jnp.max(mask, axis=-1, keepdims=True)
        if self.mask_downsample == "nearest":
            return (mask[:, ::f, ::f] >= 0.5).astype(mask.dtype)
        b, h, w, _ = mask.shape
        return jnp.max(mask.reshape(b, h // f, f, w // f, f, 1), axis=(2, 4))
