"""Predictors: one reverse-time step from ``t`` to ``t - dt``.

Each predictor is a pure function
``step(sde, score_fn, keys, x, t, dt) -> (x_next, x_next_mean)`` where ``keys``
holds one PRNG key per example, ``t`` and ``dt`` are per-example ``[B]`` arrays
(``dt > 0``) and ``x_next_mean`` is the step without its final noise (used for
the noise-free last step). Deterministic (ODE) predictors return ``x`` twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax.numpy as jnp

from sdedit_jax.rng import example_noise
from sdedit_jax.sde import SDE, Array, ScoreFn, batch_bcast


class Predictor(Protocol):
    def __call__(
        self, sde: SDE, score_fn: ScoreFn, keys: Array, x: Array, t: Array, dt: Array
    ) -> tuple[Array, Array]: ...


def euler_maruyama(sde, score_fn, keys, x, t, dt):
    """Euler-Maruyama on the reverse SDE ``dx = [f - g^2 score] dt + g dw``."""
    drift = sde.reverse_drift(x, t, score_fn(x, t))
    x_mean = x - drift * batch_bcast(dt, x)
    noise_scale = batch_bcast(sde.diffusion(t) * jnp.sqrt(dt), x)
    return x_mean + noise_scale * example_noise(keys, x), x_mean


def reverse_diffusion(sde, score_fn, keys, x, t, dt):
    """Reverse of the forward discretisation (Song et al.'s reverse-diffusion sampler)."""
    f, big_g = sde.discretize(x, t, dt)
    x_mean = x - (f - big_g**2 * score_fn(x, t))
    return x_mean + big_g * example_noise(keys, x), x_mean


def ancestral(sde, score_fn, keys, x, t, dt):
    """Ancestral sampling through the exact one-step kernel ``x_t = a x_s + sqrt(v) z``.

    The mean ``(x + v * score) / a`` is the exact posterior mean E[x_s | x_t]
    (Tweedie on the one-step kernel); the variance is the posterior variance
    for a point-mass data distribution, ``v * std(s)^2 / std(t)^2``. For VE
    this is SMLD's ancestral sampler, for VP DDPM's with its "beta tilde"
    variance; it applies unchanged to any linear SDE (sub-VP included).
    """
    s = t - dt
    a, v = sde.transition(t, s)
    x_mean = (x + batch_bcast(v, x) * score_fn(x, t)) / batch_bcast(a, x)
    var = v * sde.marginal_var(s) / sde.marginal_var(t)
    return x_mean + batch_bcast(jnp.sqrt(var), x) * example_noise(keys, x), x_mean


def ode_euler(sde, score_fn, keys, x, t, dt):
    """Euler step of the probability-flow ODE (deterministic)."""
    del keys
    x = x - sde.reverse_drift(x, t, score_fn(x, t), ode=True) * batch_bcast(dt, x)
    return x, x


def ode_heun(sde, score_fn, keys, x, t, dt):
    """Heun (explicit trapezoid) step of the probability-flow ODE: 2nd order."""
    del keys
    dtb = batch_bcast(dt, x)
    d1 = sde.reverse_drift(x, t, score_fn(x, t), ode=True)
    x_euler = x - d1 * dtb
    d2 = sde.reverse_drift(x_euler, t - dt, score_fn(x_euler, t - dt), ode=True)
    x = x - 0.5 * (d1 + d2) * dtb
    return x, x


def identity(sde, score_fn, keys, x, t, dt):
    """No predictor (corrector-only sampling)."""
    del sde, score_fn, keys, t, dt
    return x, x


PREDICTORS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
    "ode_euler": ode_euler,
    "ode_heun": ode_heun,
    "none": identity,
}
