"""DPM-Solver++(2M), SDE-DPM-Solver++(2M) and (3M) (Lu et al., 2022) for any linear SDE.

Both are exponential integrators in the log-SNR ``lambda = log(alpha/sigma)``
with the data prediction ``D = E[x_0 | x_t]`` as the model output. One step
from ``t`` to ``s`` (``h = lambda_s - lambda_t > 0``):

* ODE:  ``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D'``
* SDE:  ``x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s (1 - e^{-2h}) D'
  + sigma_s sqrt(1 - e^{-2h}) z``

where ``D' = D_t + (D_t - D_prev) / (2 r)``, ``r = h_prev / h``, is the
multistep (midpoint) second-order correction from the previous step's data
prediction. The first step has no history and is first order (``D' = D_t``:
DDIM with eta 0 or 1). The history is the previous ``D`` and ``h``; a
finished example keeps its history untouched, like its sample.

SDE-DPM-Solver++(3M) keeps two previous data predictions and integrates the quadratic
in ``lambda`` through the three exactly:
``x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s [(1 - e^{-2h}) D0 + (1 - phi) D1
+ (1 + (1 - e^{-2h} - 2h) / (2h^2)) D2] + sigma_s sqrt(1 - e^{-2h}) z``, with
``phi = (1 - e^{-2h}) / (2h)`` and diffusers' divided differences ``D1 ~ h D'``,
``D2 ~ h^2 D'' / 2`` of the history. Its D0 and D1 terms, warm-up (first order, then
the 2M step) and noise are diffusers' ``sde-dpmsolver++`` with ``solver_order=3``; its D2
coefficient is not: diffusers' ``(1 - e^{-2h} - 2h) / (2h)^2 - 1/2`` tends to -1 as
``h -> 0`` where the integral's tends to 0, which makes that update first order in the
drift (measured in EVALUATION.md). Few, uneven log-SNR steps make it unstable (the fit
divides noisy differences by step ratios): see EVALUATION.md before using it at 5 steps.

Masked edits (:mod:`sdedit_jax.edit`) reset the known pixels of ``x`` after
every step. The history keeps the network's own ``D`` at the (already
projected) state it was evaluated on, unmodified: the update is elementwise,
so the known pixels of ``D`` only ever reach known pixels of ``x``, which the
projection overwrites, and the editable pixels see exactly the multistep
update of the state the network saw.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

from sdedit_jax import rng
from sdedit_jax.rng import example_noise
from sdedit_jax.sampling.solver import SolverState, alpha_sigma_lambda, data_prediction
from sdedit_jax.sde import Array, batch_bcast


class History(NamedTuple):
    """The previous step's data prediction, its log-SNR step and whether one was taken."""

    data: Array  # [B, ...]
    h: Array  # [B]
    taken: Array  # [B] bool


def _init(x: Array) -> SolverState:
    # Built from x (not from a shape) so that inside shard_map the history
    # varies over the data axis like x does.
    first = x.reshape(x.shape[0], -1)[:, 0]
    history = History(jnp.zeros_like(x), jnp.ones_like(first), jnp.zeros_like(first, bool))
    return SolverState(x, x, history)


def _multistep_data(sde, score_fn, state, t, t_next):
    """(alpha_s, sigma_s, sigma_s / sigma_t, h, D', new history) of one 2M step."""
    x, history = state.x, state.history
    alpha, sigma, lam = alpha_sigma_lambda(sde, t)
    alpha_next, sigma_next, lam_next = alpha_sigma_lambda(sde, t_next)
    h = lam_next - lam
    data = data_prediction(score_fn(x, t), x, alpha, sigma)
    # 1 / (2 r) = h / (2 h_prev); zero on the first step (first order).
    weight = jnp.where(history.taken, 0.5 * h / history.h, 0.0)
    corrected = data + batch_bcast(weight, x) * (data - history.data)
    new_history = History(data, h, jnp.ones_like(history.taken))
    return alpha_next, sigma_next, sigma_next / sigma, h, corrected, new_history


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M:
    """DPM-Solver++(2M) on the probability-flow ODE: deterministic, second order, 1 call/step."""

    nfe_per_step: int = 1
    order: int = 2
    stochastic: bool = False
    # Measured (sdedit_jax.tools.solver_table): 14x smaller error than uniform-t at 10 steps on VP,
    # 2x smaller than Karras'.
    default_grid: str = "logsnr"

    def init(self, x):
        return _init(x)

    def step(self, sde, score_fn, keys, state, t, t_next):
        del keys
        alpha_next, _, ratio, h, data, history = _multistep_data(sde, score_fn, state, t, t_next)
        x = state.x
        x = batch_bcast(ratio, x) * x + batch_bcast(-alpha_next * jnp.expm1(-h), x) * data
        return SolverState(x, x, history)


@dataclasses.dataclass(frozen=True)
class SDEDPMSolverPP2M:
    """SDE-DPM-Solver++(2M) on the reverse SDE: stochastic, 1 call/step."""

    nfe_per_step: int = 1
    order: int = 1  # strong order; second order in the drift
    stochastic: bool = True
    # Measured (sdedit_jax.tools.solver_table): output variance within 2 % at 20 steps on VP
    # (uniform-t: +52 %, Karras: +3 %).
    default_grid: str = "logsnr"

    def init(self, x):
        return _init(x)

    def step(self, sde, score_fn, keys, state, t, t_next):
        alpha_next, sigma_next, ratio, h, data, history = _multistep_data(
            sde, score_fn, state, t, t_next
        )
        x = state.x
        fresh = -jnp.expm1(-2.0 * h)
        x_mean = batch_bcast(ratio * jnp.exp(-h), x) * x + batch_bcast(alpha_next * fresh, x) * data
        noise = example_noise(rng.fold_in(keys, 1), x)
        x = x_mean + batch_bcast(sigma_next * jnp.sqrt(fresh), x) * noise
        return SolverState(x, x_mean, history)


class History3(NamedTuple):
    """The last two steps' data predictions and log-SNR steps, and how many were taken (<= 2)."""

    data: Array  # [B, ...], the previous step's
    data_prev: Array  # [B, ...], the one before
    h: Array  # [B]
    h_prev: Array  # [B]
    taken: Array  # [B] int32


def _init3(x: Array) -> SolverState:
    first = x.reshape(x.shape[0], -1)[:, 0]
    zeros, ones = jnp.zeros_like(x), jnp.ones_like(first)
    return SolverState(x, x, History3(zeros, zeros, ones, ones, jnp.zeros_like(first, jnp.int32)))


def _third_order_weights(h: Array, h0: Array, h1: Array, taken: Array):
    """Per-example weights ``(w0, w1)`` of ``D_t - D_prev`` and ``D_prev - D_prev2`` in the
    data term ``alpha_s (1 - e^{-2h}) D0 + w0 (D_t - D_prev) + w1 (D_prev - D_prev2)``
    divided by ``alpha_s``: first order with no history, the 2M midpoint with one step of
    it, the exact integral of the quadratic through all three with two (``h0, h1``: the
    last two log-SNR steps)."""
    fresh = -jnp.expm1(-2.0 * h)
    r0, r1 = h0 / h, h1 / h
    c1 = 1.0 - fresh / (2.0 * h)  # coefficient of D1
    c2 = 1.0 + (fresh - 2.0 * h) / (2.0 * h**2)  # of D2
    # D1_0 = (D_t - D_prev) / r0, D1_1 = (D_prev - D_prev2) / r1,
    # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
    a = (c1 * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1)) / r0  # of D_t - D_prev
    b = -(c1 * r0 / (r0 + r1) + c2 / (r0 + r1)) / r1  # of D_prev - D_prev2
    w0 = jnp.where(taken >= 2, a, jnp.where(taken == 1, 0.5 * fresh / r0, 0.0))
    w1 = jnp.where(taken >= 2, b, 0.0)
    return fresh, w0, w1


@dataclasses.dataclass(frozen=True)
class SDEDPMSolverPP3M:
    """SDE-DPM-Solver++(3M) on the reverse SDE: stochastic, 1 call/step, a quadratic history."""

    nfe_per_step: int = 1
    order: int = 1  # strong order; third order in the drift
    stochastic: bool = True
    default_grid: str = "logsnr"

    def init(self, x):
        return _init3(x)

    def step(self, sde, score_fn, keys, state, t, t_next):
        x, history = state.x, state.history
        alpha, sigma, lam = alpha_sigma_lambda(sde, t)
        alpha_next, sigma_next, lam_next = alpha_sigma_lambda(sde, t_next)
        h = lam_next - lam
        data = data_prediction(score_fn(x, t), x, alpha, sigma)
        fresh, w0, w1 = _third_order_weights(h, history.h, history.h_prev, history.taken)
        x_mean = (
            batch_bcast(sigma_next / sigma * jnp.exp(-h), x) * x
            + batch_bcast(alpha_next * fresh, x) * data
            + batch_bcast(alpha_next * w0, x) * (data - history.data)
            + batch_bcast(alpha_next * w1, x) * (history.data - history.data_prev)
        )
        noise = example_noise(rng.fold_in(keys, 1), x)
        x = x_mean + batch_bcast(sigma_next * jnp.sqrt(fresh), x) * noise
        taken = jnp.minimum(history.taken + 1, 2)
        return SolverState(x, x_mean, History3(data, history.data, h, history.h, taken))


SOLVERS = {
    "dpm_solver_2m": DPMSolverPP2M,
    "sde_dpm_solver_2m": SDEDPMSolverPP2M,
    "sde_dpm_solver_3m": SDEDPMSolverPP3M,
}
