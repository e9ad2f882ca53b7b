"""The reverse-time integrator: one loop over per-example time grids.

What the equation is lives in :mod:`sdedit_jax.sde`, how one step is taken in
the solvers (:mod:`classic` adapts the predictors and correctors, :mod:`ddim`,
:mod:`dpm_solver`), where the steps fall in :mod:`grids`, and *when* to step
here: each example runs its own number of steps from its own ``t_start`` to
``t_end``. Start times and step counts are traced arrays, so a batch can mix
them and changing them never recompiles; the compiled program is fixed by the
static :class:`sampler.Sampler` (whose ``max_steps`` is the step-count bucket). The loop
carries the solver's state (:class:`solver.SolverState`) and runs as many
iterations as the largest step count in the batch; an example that has
finished keeps its whole state (sample and history) untouched. A noise-free end
(sigma = 0) is reached by one final data-prediction step after the loop, so no
solver and no corrector ever evaluates the score at sigma = 0; the grid decides
where that step starts (:meth:`grids.UniformGrid.noisy_end`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from sdedit_jax import rng
from sdedit_jax.sampling import classic, grids
from sdedit_jax.sampling.solver import data_step
from sdedit_jax.sde import SDE, Array, ScoreFn, batch_bcast

if TYPE_CHECKING:
    from sdedit_jax.sampling.sampler import Sampler

# ``project(keys, x, t)`` maps the state after a step at time ``t`` back onto a
# constraint (e.g. the known pixels of a masked edit).
Projection = Callable[[Array, Array, Array], Array]


def grid_time(t_start: Array, t_end: Array, n_steps: Array, i: Array) -> Array:
    """Time after ``i`` of ``n_steps`` uniform steps from ``t_start`` to ``t_end`` (all ``[B]``)."""
    return grids.UniformGrid().time(None, t_start, t_end, n_steps, i)


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

    Where ``t_end`` is noise-free (``marginal_std(t_end) == 0``) on an SDE with
    ``noise_free_end`` (``DiscreteVPSDE``, ``eps = 0``), the first ``n_steps - 1`` steps
    follow the grid down to its ``noisy_end`` (``t_start / n_steps`` on the uniform grid,
    at least ``sde.last_noisy_time``) and the last one is the data prediction from there
    (:func:`solver.data_step`; a PC sampler's corrector still runs before it): no score
    is ever evaluated at sigma = 0, and the step count still counts network calls.

    Args:
        keys: one PRNG key per example; step ``i`` uses ``fold_in(key, i)``.
        x: state at ``t_start``, ``[B, ...]``.
        n_steps: ``[B]`` int steps per example (default ``sampler.max_steps``).
        project: optional constraint applied to the sample and its mean after
            every step (the solver's history is left as the solver made it).

    Returns:
        The sample at ``t_end`` (the last step's mean if ``sampler.denoise``).
    """
    solver, grid = sampler.solver, sampler.grid
    if n_steps is None:
        n_steps = jnp.full(t_start.shape, sampler.max_steps, jnp.int32)
    n_steps = jnp.clip(n_steps, 1, sampler.max_steps)
    grid_end, loop_steps, grid_steps = t_end, n_steps, n_steps
    if sde.noise_free_end:
        # A noise-free t_end (sigma = 0: a discrete schedule's t = 0) has an infinite
        # log-SNR: its grid ends at the SDE's last noisy time, its last step predicts the data.
        to_data = sde.marginal_std(t_end) == 0
        grid_end = jnp.where(to_data, grid.noisy_end(sde, t_start, n_steps), t_end)
        # Steps on the grid; none when t_start is already at the last noisy time.
        loop_steps = jnp.where(to_data, jnp.where(t_start > grid_end, n_steps - 1, 0), n_steps)
        grid_steps = jnp.maximum(loop_steps, 1)

    def step(i, state):
        t = grid.time(sde, t_start, grid_end, grid_steps, i)
        t_next = grid.time(sde, t_start, grid_end, grid_steps, i + 1)
        step_keys = rng.fold_in(keys, i)
        new = solver.step(sde, score_fn, step_keys, state, t, t_next)
        return _advance(i < loop_steps, new, state, step_keys, t_next, project)

    def final_step(state):
        t = jnp.where(loop_steps > 0, grid_end, t_start)
        step_keys = jax.vmap(jax.random.fold_in)(keys, loop_steps)  # step index n_steps - 1
        new = state
        if isinstance(solver, classic.Corrected):  # a PC sampler corrects at t first
            new = solver.correct(sde, score_fn, step_keys, new, t, t_end)
        new = data_step(sde, score_fn, new, t, t_end)
        return _advance(to_data, new, state, step_keys, t_end, project)

    # Without a noise-free end the program is the loop alone, as it always was.
    state = jax.lax.fori_loop(0, jnp.max(loop_steps), step, solver.init(x))
    if sde.noise_free_end:
        state = jax.lax.cond(jnp.any(to_data), final_step, lambda s: s, state)
    return state.x_mean if sampler.denoise else state.x


def _advance(active, new, state, step_keys, t_next, project):
    """``new`` where ``active`` (per example), projected at ``t_next``; ``state`` elsewhere."""
    if project is not None:
        project_keys = rng.fold_in(step_keys, 2)
        new = new._replace(
            x=project(project_keys, new.x, t_next),
            x_mean=project(project_keys, new.x_mean, t_next),
        )
    return jax.tree_util.tree_map(lambda a, b: jnp.where(batch_bcast(active, a), a, b), new, state)


def sample_prior(
    sde: SDE, score_fn: ScoreFn, sampler: Sampler, keys: Array, shape: tuple[int, ...]
) -> Array:
    """Unconditional samples: prior noise at ``T`` integrated down to ``eps``."""
    batch = shape[0]
    x = sde.prior_std * rng.example_noise(rng.fold_in(keys, 0), jnp.zeros(shape))
    t_start = jnp.full((batch,), sde.T)
    t_end = jnp.full((batch,), sde.eps)
    return integrate(sde, score_fn, sampler, rng.fold_in(keys, 1), x, t_start, t_end)
