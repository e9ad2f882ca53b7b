"""Closed forms for Gaussian data ``x_0 ~ N(mu, s^2)`` per pixel: truth for solvers and SDEdit.

With this data the score is exact (:class:`GaussianScore`), every marginal is
Gaussian, the probability-flow map is affine and SDEdit's output distribution is
known; the tests and ``solver_table`` measure the solvers against these, so any
error left is the solver's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sdedit_jax.sde import SDE


@dataclasses.dataclass(frozen=True)
class GaussianScore:
    """Exact score of ``p_t = N(m(t) mu, m(t)^2 s^2 + std(t)^2)`` (elementwise)."""

    sde: SDE
    mu: float
    s: float

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        m = jnp.exp(self.sde.log_mean_coeff(t)).reshape((-1,) + (1,) * (x.ndim - 1))
        std = self.sde.marginal_std(t).reshape(m.shape)
        # Multiply by a per-example reciprocal rather than divide by a broadcast:
        # XLA rewrites the latter in some programs only (see engine docs).
        precision = 1.0 / (m**2 * self.s**2 + std**2)
        return -(x - m * self.mu) * precision


def data_marginal(sde: SDE, mu: float, s: float, t: float) -> tuple[float, float]:
    """Mean and standard deviation of ``p_t = N(m(t) mu, m(t)^2 s^2 + std(t)^2)``."""
    t_arr = jnp.asarray([t])
    log_m = sde.log_mean_coeff(t_arr)
    std = jnp.sqrt(jnp.exp(2 * log_m) * s**2 + sde.marginal_var(t_arr))
    return float(jnp.exp(log_m)[0]) * mu, float(std[0])


def flow_map(sde: SDE, mu: float, s: float, x, t_from: float, t_to: float):
    """The probability-flow ODE's exact map of ``x`` from ``t_from`` to ``t_to``.

    Affine for Gaussian data: it keeps ``(x - mean_t) / std_t`` fixed.
    """
    (mean_from, std_from), (mean_to, std_to) = (
        data_marginal(sde, mu, s, t) for t in (t_from, t_to)
    )
    return mean_to + std_to * (x - mean_from) / std_from


def sdedit_moments(
    sde: SDE, mu: float, s: float, guide, t0: float, t_end: float, guide_var: float = 0.0
):
    """Mean and variance of SDEdit's output at ``t_end`` given a guide, exactly.

    The reverse SDE started at ``x_t0 ~ p(x_t0 | x_0 = guide)`` with the exact
    score ends at ``p(x_end | x_t0)``. Everything is linear-Gaussian:
    ``x_end ~ N(m_e mu, m_e^2 s^2 + std_e^2)`` and ``x_t0 = a x_end + sqrt(v) z``.
    A random guide ``N(guide, guide_var)`` (a previous repeat's output) adds
    its variance through the same linear map.
    """
    f = lambda v: float(np.asarray(v))  # noqa: E731
    t_end_arr, t0_arr = jnp.asarray([t_end]), jnp.asarray([t0])
    m_e = np.exp(f(sde.log_mean_coeff(t_end_arr)[0]))
    std_e = f(sde.marginal_std(t_end_arr)[0])
    a, v = (f(u[0]) for u in sde.transition(t0_arr, t_end_arr))
    m_0 = np.exp(f(sde.log_mean_coeff(t0_arr)[0]))
    std_0 = f(sde.marginal_std(t0_arr)[0])
    prior_mean, prior_var = m_e * mu, m_e**2 * s**2 + std_e**2
    precision = 1.0 / prior_var + a**2 / v
    mean = (prior_mean / prior_var + a * m_0 * np.asarray(guide) / v) / precision
    gain = a / v / precision
    var = 1.0 / precision + gain**2 * (std_0**2 + m_0**2 * guide_var)
    return mean, var


def reverse_moments(
    sde: SDE,
    mu: float,
    s: float,
    guide,
    t0: float,
    t_end: float,
    eta: float = 1.0,
    steps: int = 20000,
):
    """Mean and variance at ``t_end`` of the reverse-time family
    ``dx = [f - (1 + eta^2) / 2 g^2 score] dt + eta g dw`` started at ``p(x_t0 | guide)``.

    Every ``eta`` keeps the marginals ``p_t``, but the output given ``x_t0`` differs:
    ``eta = 1`` is the reverse SDE (:func:`sdedit_moments`), ``eta = 0`` the
    probability-flow ODE and ``0 < eta < 1`` DDIM's continuous limit. With the exact
    Gaussian score the output is ``A x_t0 + B`` plus noise of variance ``V``, whose
    linear ODEs are integrated here with RK4 in float64 (``steps`` steps).
    """
    t = np.linspace(t0, t_end, 2 * steps + 1)
    tj = jnp.asarray(t, jnp.float32)
    f = np.asarray(sde.drift_coeff(tj), np.float64)
    g2 = np.asarray(sde.diffusion(tj), np.float64) ** 2
    m = np.exp(np.asarray(sde.log_mean_coeff(tj), np.float64))
    k = 0.5 * (1.0 + eta**2) * g2 / (m**2 * s**2 + np.asarray(sde.marginal_var(tj), np.float64))

    def rhs(i, y):  # d/d(t0 - t) of (A, B, V)
        decay = f[i] + k[i]
        return np.array(
            [-decay * y[0], -decay * y[1] + k[i] * m[i] * mu, -2 * decay * y[2] + eta**2 * g2[i]]
        )

    h, y = (t0 - t_end) / steps, np.array([1.0, 0.0, 0.0])
    for n in range(steps):
        i = 2 * n
        k1 = rhs(i, y)
        k2 = rhs(i + 1, y + 0.5 * h * k1)
        k3 = rhs(i + 1, y + 0.5 * h * k2)
        k4 = rhs(i + 2, y + h * k3)
        y = y + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    a, b, v = y
    m0 = np.exp(float(np.asarray(sde.log_mean_coeff(jnp.asarray([t0])))[0]))
    var0 = float(np.asarray(sde.marginal_var(jnp.asarray([t0])))[0])
    return a * m0 * np.asarray(guide) + b, a**2 * var0 + v
