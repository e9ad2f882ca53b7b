"""Continuous-time denoising score matching (Song et al., 2021, eq. 7).

For ``t ~ U(eps, T)`` and ``x_t = m(t) x_0 + s(t) z`` the regression target of
the score is ``-z / s(t)``. With the default weighting ``lambda(t) = s(t)^2``
the loss is ``|s score + z|^2``, which equals DDPM's noise-prediction loss for
the ``"noise"`` parameterisation; likelihood weighting uses
``lambda(t) = g(t)^2`` instead (a bound on the negative log-likelihood).

Randomness is derived per example with ``fold_in(step_key, global_index)``,
so the sampled times and noise do not depend on how the batch is split over
devices: a sharded step computes the same loss as an unsharded one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax import score as score_lib
from sdedit_jax.sde import SDE

Array = jax.Array


def per_example_keys(step_key: Array, batch_size: int) -> Array:
    """``[batch_size]`` keys, the i-th being ``fold_in(step_key, i)``."""
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch_size))


def sample_times_and_noise(step_key: Array, images: Array, sde: SDE) -> tuple[Array, Array]:
    """Per-example ``t ~ U(eps, T)`` and ``z ~ N(0, I)`` shaped like ``images``."""
    keys = per_example_keys(step_key, images.shape[0])

    def one(key: Array, image: Array) -> tuple[Array, Array]:
        t_key, z_key = jax.random.split(key)
        t = jax.random.uniform(t_key, (), minval=sde.eps, maxval=sde.T)
        return t, jax.random.normal(z_key, image.shape, image.dtype)

    return jax.vmap(one)(keys, images)


def dsm_loss(
    model: nnx.Module,
    sde: SDE,
    images: Array,
    step_key: Array,
    *,
    parameterization: str,
    condition: str,
    likelihood_weighting: bool = False,
    train: bool = True,
) -> Array:
    """Mean over batch and pixels of the weighted score-matching error.

    Args:
        model: the network, called ``model(x, t, train=..., rngs=...)``
            (:mod:`sdedit_jax.models.architecture`; e.g. :mod:`sdedit_jax.models.unet`).
        sde: forward SDE.
        images: clean data ``[B, H, W, C]``.
        step_key: one key per step; per-example keys are folded in from it.
        parameterization, condition: see :mod:`sdedit_jax.score` (``condition``: the
            network's time input, e.g. :func:`sdedit_jax.models.unet.condition`).
        likelihood_weighting: weight by ``g(t)^2`` instead of ``s(t)^2``.
        train: enables dropout.
    """
    noise_key, dropout_key = jax.random.split(step_key)
    t, z = sample_times_and_noise(noise_key, images, sde)
    mean, std = sde.marginal(images, t)
    x_t = mean + std * z
    rngs = nnx.Rngs(dropout=dropout_key) if train else None
    score = score_lib.apply_score(
        model, sde, parameterization, condition, x_t, t, train=train, rngs=rngs
    )
    if likelihood_weighting:
        g2 = jnp.reshape(sde.diffusion(t) ** 2, t.shape + (1,) * (images.ndim - 1))
        error = g2 * jnp.square(score + z / std)
    else:
        error = jnp.square(score * std + z)
    return jnp.mean(error)
