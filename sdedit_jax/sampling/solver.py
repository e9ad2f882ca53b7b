"""The solver interface: a per-example state advanced one step at a time.

A solver has diffrax's shape: ``init`` builds the state of a batch at its
start, ``step`` advances every example from ``t`` to ``t_next`` (both ``[B]``)
and returns the new state. The integrator (:mod:`integrate`) carries the state
through its loop, so multistep solvers keep their history (e.g. the previous
data prediction and its log-SNR step) without the loop knowing what it is.
Every leaf of a state has the batch as its leading axis, which lets the loop
freeze an example that has finished (``jnp.where`` per example, leaf by leaf).

Solvers also declare what the engine needs to know about them: network calls
per step (``nfe_per_step``, for accounting), convergence ``order`` (tests are
parametrised by it) and ``default_grid``, the time grid measured to suit them
(see :mod:`grids`). A solver's own settings (DDIM's ``eta``, Langevin's ``snr``)
are its dataclass fields made with :func:`option`: a default, a one-line meaning and
the solver's ``__post_init__`` checks; :mod:`sampler` reads them from there for the
``Sampler``, the config block, its help and the fingerprint (:func:`options_of`).

Quantities of a linear SDE used by the exponential-integrator solvers
(DDIM, DPM-Solver++) are the kernel's ``alpha_t = exp(log_mean_coeff(t))``,
``sigma_t = marginal_std(t)`` and ``lambda_t = log(alpha_t / sigma_t)``, all
from base-class methods of :class:`sdedit_jax.sde.SDE`, so a solver works for
every SDE with a Gaussian kernel (VP, sub-VP, VE, discrete DDPM schedules).

No solver ever steps to a noise-free time (sigma = 0, an infinite log-SNR): the
integrator's grids end at the SDE's last noisy time and its final step to sigma = 0
is :func:`data_step`, the same for every solver (diffusers' ``final_sigmas_type="zero"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax.numpy as jnp

from sdedit_jax.sde import SDE, Array, ScoreFn, batch_bcast


class SolverState(NamedTuple):
    """The loop's carry: the sample, its noise-free mean and a solver's own history.

    ``x_mean`` is the last step without its final noise (what ``denoise``
    returns); ``history`` is any pytree of ``[B, ...]`` arrays (``()`` for
    one-step solvers).
    """

    x: Array
    x_mean: Array
    history: Any = ()


class Solver(Protocol):
    """What the integrator needs from a solver (frozen dataclasses: hashable, static)."""

    nfe_per_step: int
    order: int
    stochastic: bool
    default_grid: str

    def init(self, x: Array) -> SolverState: ...

    def step(
        self,
        sde: SDE,
        score_fn: ScoreFn,
        keys: Array,
        state: SolverState,
        t: Array,
        t_next: Array,
    ) -> SolverState:
        """One step from ``t`` to ``t_next < t``; ``keys[B]`` are this step's keys."""
        ...


def option(default: Any, doc: str) -> Any:
    """A solver's own setting: a dataclass field with its ``default`` and one-line ``doc``.

    Its name is also the config key (``sampler.<name>``) and the ``sdedit`` keyword.
    """
    return dataclasses.field(default=default, metadata={"option": doc})


def option_docs(solver: Any) -> dict[str, str]:
    """The options a solver (class or instance) declares, with their meaning."""
    return {
        f.name: f.metadata["option"] for f in dataclasses.fields(solver) if "option" in f.metadata
    }


def options_of(solver: Any) -> dict[str, Any]:
    """A solver instance's option values."""
    return {name: getattr(solver, name) for name in option_docs(solver)}


def alpha_sigma_lambda(sde: SDE, t: Array) -> tuple[Array, Array, Array]:
    """``alpha_t``, ``sigma_t`` and the log-SNR ``lambda_t = log(alpha_t / sigma_t)`` (``[B]``)."""
    log_alpha = sde.log_mean_coeff(t)
    sigma = sde.marginal_std(t)
    return jnp.exp(log_alpha), sigma, log_alpha - jnp.log(sigma)


def log_snr(sde: SDE, t: Array) -> Array:
    """``lambda_t = log(alpha_t / sigma_t)``, decreasing in ``t``."""
    return alpha_sigma_lambda(sde, t)[2]


def data_prediction(score: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """Tweedie's ``E[x_0 | x_t] = (x_t + sigma^2 score) / alpha`` (per-example ``alpha, sigma``).

    Multiplies by a per-example reciprocal (see :mod:`sdedit_jax.engine` on
    bit-reproducibility).
    """
    return (x + batch_bcast(sigma**2, x) * score) * batch_bcast(1.0 / alpha, x)


def data_step(sde: SDE, score_fn: ScoreFn, state: SolverState, t: Array, t_next: Array):
    """The step from ``t`` to a noise-free ``t_next`` (sigma = 0): ``x = alpha_next E[x_0 | x_t]``.

    One score call, at ``t``; the exact solution of every reverse process (ODE or SDE)
    there, since ``x_t = alpha_t x_0`` at sigma = 0. The history is kept (nothing follows).
    """
    alpha, sigma, _ = alpha_sigma_lambda(sde, t)
    x = data_prediction(score_fn(state.x, t), state.x, alpha, sigma)
    x = batch_bcast(jnp.exp(sde.log_mean_coeff(t_next)), x) * x
    return SolverState(x, x, state.history)
