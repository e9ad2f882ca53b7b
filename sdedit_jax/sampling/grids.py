"""Time grids: where each example's steps fall between its own ``t_start`` and ``t_end``.

A grid maps step index ``i`` of ``n_steps`` to a time, per example (all ``[B]``
and traced, so start times and step counts never recompile). Every grid starts
exactly at the example's continuous ``t_start`` (SDEdit's ``t0``, no discrete
rounding) and ends at ``t_end`` (``eps``): exactly for the log-SNR and Karras
grids; the uniform grid keeps the engine's original formula
``t_start + (t_end - t_start) * i / n`` (so earlier outputs stay bit-identical),
whose last point is ``eps`` up to one float32 rounding of ``t_start`` (~6e-8).
Where ``eps`` is noise-free (an infinite log-SNR, ``DiscreteVPSDE``'s t = 0) the
integrator ends the grid one step short, at the grid's :meth:`noisy_end`, and takes
the last step to ``eps`` itself as a data prediction (see :func:`integrate.integrate`).
The uniform grid then keeps its even spacing all the way to the data: ``n`` steps from
``t0`` fall on ``t0 (1 - i / n)`` and the last one predicts the data from ``t0 / n``
(diffusers' DDIM with ``timestep_spacing="trailing"``), never below the SDE's
``last_noisy_time``; the log-SNR grids end at ``last_noisy_time``.

* ``uniform``: uniform in ``t`` (the score-SDE papers' and SDEdit's grid);
* ``logsnr``: uniform in the log-SNR ``lambda_t = log(alpha_t / sigma_t)``
  (DPM-Solver's grid; exponential integrators take equal ``h`` steps);
* ``karras``: Karras et al.'s ``rho = 7`` grid in ``sigma_t / alpha_t = exp(-lambda)``,
  denser near the data.

Grids in ``lambda`` are mapped back to ``t`` by bisection on the SDE's own
``lambda_t`` (base-class methods only, so any linear SDE works).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sdedit_jax.sampling.solver import log_snr
from sdedit_jax.sde import SDE, Array

_BISECTION_STEPS = 48  # halves [t_end, t_start] below float32 resolution


def _fraction(n_steps: Array, i: Array, dtype) -> Array:
    return jnp.minimum(i, n_steps).astype(dtype) / n_steps.astype(dtype)


def time_for_log_snr(sde: SDE, lam: Array, lo: Array, hi: Array) -> Array:
    """The ``t`` in ``[lo, hi]`` with ``lambda_t = lam`` (``lambda`` decreases in ``t``)."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = log_snr(sde, mid) > lam  # lambda too large: t is later
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, hi))
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class UniformGrid:
    """Uniform in ``t``."""

    def time(self, sde: SDE, t_start: Array, t_end: Array, n_steps: Array, i: Array) -> Array:
        del sde
        return t_start + (t_end - t_start) * _fraction(n_steps, i, t_start.dtype)

    def noisy_end(self, sde: SDE, t_start: Array, n_steps: Array) -> Array:
        """Where ``n_steps`` to a noise-free end leave the grid: one even step before it."""
        return jnp.maximum(t_start / n_steps.astype(t_start.dtype), sde.last_noisy_time)


@dataclasses.dataclass(frozen=True)
class _LambdaGrid:
    """A grid defined in ``lambda``; the ends are the exact ``t_start`` and ``t_end``."""

    def log_snr_at(self, lam_start: Array, lam_end: Array, frac: Array) -> Array:
        raise NotImplementedError

    def time(self, sde: SDE, t_start: Array, t_end: Array, n_steps: Array, i: Array) -> Array:
        frac = _fraction(n_steps, i, t_start.dtype)
        lam = self.log_snr_at(log_snr(sde, t_start), log_snr(sde, t_end), frac)
        t = time_for_log_snr(sde, lam, t_end, t_start)
        return jnp.where(frac <= 0, t_start, jnp.where(frac >= 1, t_end, t))

    def noisy_end(self, sde: SDE, t_start: Array, n_steps: Array) -> Array:
        """Where the grid ends before a noise-free end: the SDE's last noisy time."""
        del n_steps
        return jnp.full_like(t_start, sde.last_noisy_time)


@dataclasses.dataclass(frozen=True)
class LogSNRGrid(_LambdaGrid):
    """Uniform in ``lambda``."""

    def log_snr_at(self, lam_start, lam_end, frac):
        return lam_start + (lam_end - lam_start) * frac


@dataclasses.dataclass(frozen=True)
class KarrasGrid(_LambdaGrid):
    """Uniform in ``(sigma/alpha)^(1/rho)`` (Karras et al., 2022)."""

    rho: float = 7.0

    def log_snr_at(self, lam_start, lam_end, frac):
        # sigma/alpha = exp(-lambda); interpolate its 1/rho-th power.
        root_start = jnp.exp(-lam_start / self.rho)
        root_end = jnp.exp(-lam_end / self.rho)
        return -self.rho * jnp.log(root_start + (root_end - root_start) * frac)


GRIDS = {"uniform": UniformGrid(), "logsnr": LogSNRGrid(), "karras": KarrasGrid()}


def grid_from_name(name: str) -> UniformGrid | _LambdaGrid:
    if name not in GRIDS:
        raise ValueError(f"time_grid: unknown name {name!r}; choose from {sorted(GRIDS)}")
    return GRIDS[name]
