"""Correctors: score-based MCMC moves at a fixed time ``t``.

A corrector is a frozen dataclass carrying its own options (:func:`solver.option`)
with ``nfe_per_step`` (network calls per time step) and
``correct(sde, score_fn, keys, x, t, dt) -> (x, x_mean)``; :class:`classic.Corrected`
runs it before a solver's step.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax.numpy as jnp

from sdedit_jax.rng import example_noise, fold_in
from sdedit_jax.sampling.solver import option
from sdedit_jax.sde import SDE, Array, ScoreFn, batch_bcast


class Corrector(Protocol):
    """What :class:`classic.Corrected` needs from a corrector (a frozen dataclass)."""

    nfe_per_step: int

    def correct(
        self, sde: SDE, score_fn: ScoreFn, keys: Array, x: Array, t: Array, dt: Array
    ) -> tuple[Array, Array]: ...


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


@dataclasses.dataclass(frozen=True)
class Langevin:
    """:func:`langevin` with its step-size ``snr`` and ``corrector_steps`` moves per time step."""

    snr: float = option(0.16, "signal-to-noise ratio of the Langevin corrector")
    corrector_steps: int = option(1, "corrector steps after each predictor step")

    def __post_init__(self):
        if not isinstance(self.corrector_steps, int) or self.corrector_steps < 1:
            raise ValueError(
                f"corrector_steps: must be a positive int, got {self.corrector_steps!r}"
            )
        if not self.snr > 0:
            raise ValueError(f"snr: must be > 0, got {self.snr!r}")

    @property
    def nfe_per_step(self) -> int:
        return self.corrector_steps

    def correct(self, sde, score_fn, keys, x, t, dt):
        return langevin(sde, score_fn, keys, x, t, dt, snr=self.snr, n_steps=self.corrector_steps)


@dataclasses.dataclass(frozen=True)
class NoCorrector:
    """No corrector: the sampler runs its predictor's steps alone (no corrector code at all)."""

    nfe_per_step: int = 0


CORRECTORS = {"langevin": Langevin, "none": NoCorrector}
