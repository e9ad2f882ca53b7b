"""The reverse-time integrator: one ``lax.scan`` over a per-example time grid.

What the equation is lives in :mod:`sdedit_jax.sde`, how one step is taken in
:mod:`predictors` / :mod:`correctors`, and *when* to step here: each example
runs ``n_steps`` uniform steps from its own ``t_start`` to ``t_end``. The step
count is static (it sets the scan length, hence the compiled program) while the
start times are traced, so a batch can mix start times and changing them never
recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdedit_jax import rng
from sdedit_jax.sampling.correctors import CORRECTORS
from sdedit_jax.sampling.predictors import PREDICTORS
from sdedit_jax.sde import SDE, Array, ScoreFn

# ``project(keys, x, t)`` maps the state after a step at time ``t`` back onto a
# constraint (e.g. the known pixels of a masked edit).
Projection = Callable[[Array, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The static description of a sampler; one compiled program per value.

    Attributes:
        predictor: a key of ``PREDICTORS`` ("euler_maruyama", "reverse_diffusion",
            "ancestral", "ode_euler", "ode_heun", "none").
        corrector: a key of ``CORRECTORS`` ("langevin" or "none").
        n_steps: predictor steps per integration (per SDEdit repeat).
        snr: Langevin signal-to-noise ratio.
        corrector_steps: Langevin moves per time step.
        denoise: return the noise-free mean of the last step (Song et al.'s
            "noise removal"); the state at ``t_end`` otherwise.
    """

    predictor: str = "euler_maruyama"
    corrector: str = "none"
    n_steps: int = 250
    snr: float = 0.16
    corrector_steps: int = 1
    denoise: bool = True

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise ValueError(
                f"predictor: unknown name {self.predictor!r}; choose from {sorted(PREDICTORS)}"
            )
        if self.corrector not in CORRECTORS:
            raise ValueError(
                f"corrector: unknown name {self.corrector!r}; choose from {sorted(CORRECTORS)}"
            )
        if not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps: must be a positive int, got {self.n_steps!r}")
        if not isinstance(self.corrector_steps, int) or self.corrector_steps < 1:
            raise ValueError(
                f"corrector_steps: must be a positive int, got {self.corrector_steps!r}"
            )
        if not self.snr > 0:
            raise ValueError(f"snr: must be > 0, got {self.snr!r}")

    @property
    def score_evals_per_step(self) -> int:
        """Score-model calls per time step (for throughput accounting)."""
        predictor_evals = {"ode_heun": 2, "none": 0}.get(self.predictor, 1)
        corrector_evals = self.corrector_steps if self.corrector != "none" else 0
        return predictor_evals + corrector_evals


def time_grid(t_start: Array, t_end: Array | float, n_steps: int) -> Array:
    """Uniform per-example grids ``[n_steps + 1, B]`` from ``t_start`` down to ``t_end``."""
    frac = jnp.arange(n_steps + 1, dtype=t_start.dtype)[:, None] / n_steps
    return t_start[None, :] + (t_end - t_start)[None, :] * frac


def integrate(
    sde: SDE,
    score_fn: ScoreFn,
    sampler: Sampler,
    keys: Array,
    x: Array,
    t_start: Array,
    t_end: Array,
    project: Projection | None = None,
) -> Array:
    """Integrates the reverse process from ``t_start`` to ``t_end`` (both ``[B]``).

    Args:
        keys: one PRNG key per example; step ``i`` uses ``fold_in(key, i)``.
        x: state at ``t_start``, ``[B, ...]``.
        project: optional constraint applied after every step.

    Returns:
        The sample at ``t_end`` (the last step's mean if ``sampler.denoise``).
    """
    predictor = PREDICTORS[sampler.predictor]
    corrector = CORRECTORS[sampler.corrector]
    grid = time_grid(t_start, t_end, sampler.n_steps)

    def step(carry, i):
        x, _ = carry
        t, t_next = grid[i], grid[i + 1]
        dt = t - t_next
        step_keys = rng.fold_in(keys, i)
        x, x_mean = corrector(
            sde,
            score_fn,
            rng.fold_in(step_keys, 0),
            x,
            t,
            dt,
            snr=sampler.snr,
            n_steps=sampler.corrector_steps,
        )
        x, x_mean = predictor(sde, score_fn, rng.fold_in(step_keys, 1), x, t, dt)
        if project is not None:
            project_keys = rng.fold_in(step_keys, 2)
            x = project(project_keys, x, t_next)
            x_mean = project(project_keys, x_mean, t_next)
        return (x, x_mean), None

    (x, x_mean), _ = jax.lax.scan(step, (x, x), jnp.arange(sampler.n_steps))
    return x_mean if sampler.denoise else x


def sample_prior(
    sde: SDE, score_fn: ScoreFn, sampler: Sampler, keys: Array, shape: tuple[int, ...]
) -> Array:
    """Unconditional samples: prior noise at ``T`` integrated down to ``eps``."""
    batch = shape[0]
    x = sde.prior_std * rng.example_noise(rng.fold_in(keys, 0), jnp.zeros(shape))
    t_start = jnp.full((batch,), sde.T)
    t_end = jnp.full((batch,), sde.eps)
    return integrate(sde, score_fn, sampler, rng.fold_in(keys, 1), x, t_start, t_end)
