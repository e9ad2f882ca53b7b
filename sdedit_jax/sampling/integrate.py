"""The reverse-time integrator: one loop over per-example time grids.

What the equation is lives in :mod:`sdedit_jax.sde`, how one step is taken in
:mod:`predictors` / :mod:`correctors`, and *when* to step here: each example
runs its own number of uniform steps from its own ``t_start`` to ``t_end``.
Start times and step counts are traced arrays, so a batch can mix them and
changing them never recompiles; the compiled program is fixed by the static
``Sampler`` (whose ``max_steps`` is the step-count bucket). The loop runs as
many iterations as the largest step count in the batch; an example that has
finished is left untouched by the remaining iterations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdedit_jax import rng
from sdedit_jax.sampling.correctors import CORRECTORS
from sdedit_jax.sampling.predictors import PREDICTORS
from sdedit_jax.sde import SDE, Array, ScoreFn, batch_bcast

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
        max_steps: the largest step count a program accepts (its bucket);
            per-example step counts are traced values in ``[1, max_steps]``.
        snr: Langevin signal-to-noise ratio.
        corrector_steps: Langevin moves per time step.
        denoise: return the noise-free mean of the last step (Song et al.'s
            "noise removal"); the state at ``t_end`` otherwise.
    """

    predictor: str = "euler_maruyama"
    corrector: str = "none"
    max_steps: int = 256
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
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps: must be a positive int, got {self.max_steps!r}")
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


def grid_time(t_start: Array, t_end: Array, n_steps: Array, i: Array) -> Array:
    """Time after ``i`` of ``n_steps`` uniform steps from ``t_start`` to ``t_end`` (all ``[B]``)."""
    frac = jnp.minimum(i, n_steps).astype(t_start.dtype) / n_steps.astype(t_start.dtype)
    return t_start + (t_end - t_start) * frac


def integrate(
    sde: SDE,
    score_fn: ScoreFn,
    sampler: Sampler,
    keys: Array,
    x: Array,
    t_start: Array,
    t_end: Array,
    n_steps: Array | None = None,
    project: Projection | None = None,
) -> Array:
    """Integrates the reverse process from ``t_start`` to ``t_end`` (both ``[B]``).

    Args:
        keys: one PRNG key per example; step ``i`` uses ``fold_in(key, i)``.
        x: state at ``t_start``, ``[B, ...]``.
        n_steps: ``[B]`` int steps per example (default ``sampler.max_steps``).
        project: optional constraint applied after every step.

    Returns:
        The sample at ``t_end`` (the last step's mean if ``sampler.denoise``).
    """
    predictor = PREDICTORS[sampler.predictor]
    corrector = CORRECTORS[sampler.corrector]
    if n_steps is None:
        n_steps = jnp.full(t_start.shape, sampler.max_steps, jnp.int32)
    n_steps = jnp.clip(n_steps, 1, sampler.max_steps)

    def step(i, carry):
        x_prev, x_mean_prev = carry
        t = grid_time(t_start, t_end, n_steps, i)
        t_next = grid_time(t_start, t_end, n_steps, i + 1)
        dt = t - t_next
        step_keys = rng.fold_in(keys, i)
        x, x_mean = corrector(
            sde,
            score_fn,
            rng.fold_in(step_keys, 0),
            x_prev,
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
        active = batch_bcast(i < n_steps, x)
        return jnp.where(active, x, x_prev), jnp.where(active, x_mean, x_mean_prev)

    x, x_mean = jax.lax.fori_loop(0, jnp.max(n_steps), step, (x, x))
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
