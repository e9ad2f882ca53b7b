"""Correctors: score-based MCMC moves at a fixed time ``t``.

A corrector has the signature
``correct(sde, score_fn, keys, x, t, dt, *, snr, n_steps) -> (x, x_mean)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from sdedit_jax.rng import example_noise, fold_in
from sdedit_jax.sde import SDE, Array, ScoreFn, batch_bcast


def _per_example_sq_norm(v: Array) -> Array:
    return jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)))


def langevin(
    sde: SDE,
    score_fn: ScoreFn,
    keys: Array,
    x: Array,
    t: Array,
    dt: Array,
    *,
    snr: float,
    n_steps: int,
) -> tuple[Array, Array]:
    """Annealed Langevin dynamics with a signal-to-noise-ratio step size.

    The step ``eps = 2 alpha (snr ||z|| / ||score||)^2`` is computed from each
    example's own norms, never averaged over the batch, so an example's result
    does not depend on its batch-mates. ``alpha`` is the one-step kernel's
    squared mean coefficient (``1 - beta_i`` for VP, 1 for VE), as in Song et al.
    """
    a, _ = sde.transition(t, t - dt)
    alpha = a**2
    x_mean = x
    for i in range(n_steps):
        step_keys = fold_in(keys, i)
        grad = score_fn(x, t)
        noise = example_noise(step_keys, x)
        # Squared norms avoid sqrt-then-divide, which XLA may turn into rsqrt
        # in some programs and not others (a last-bit difference).
        step = 2.0 * alpha * snr**2 * _per_example_sq_norm(noise) / _per_example_sq_norm(grad)
        x_mean = x + batch_bcast(step, x) * grad
        x = x_mean + batch_bcast(jnp.sqrt(2.0 * step), x) * noise
    return x, x_mean


def no_corrector(sde, score_fn, keys, x, t, dt, *, snr, n_steps):
    del sde, score_fn, keys, t, dt, snr, n_steps
    return x, x


CORRECTORS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "langevin": langevin,
    "none": no_corrector,
}
