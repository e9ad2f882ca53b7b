"""Every solver x every time grid x every SDE class x masked/unmasked, against closed forms.

Truth: Gaussian data ``N(MU, S^2)`` with its exact score, so the probability-flow
ODE's map and the reverse SDE's output distribution are known
(sdedit_jax.tools.gaussian_reference). Where the SDE's end is noise-free
(``DiscreteVPSDE``, sigma = 0 at t = 0) the integrator's target is the exact flow
(or output distribution) down to the grid's last noisy time followed by the exact data
prediction there, an affine map; it is checked against the flow to t = 0 too. That time
is ``sde.last_noisy_time`` for the log-SNR grids and one even step before the end,
``max(T0 / n, last_noisy_time)``, for the uniform grid (diffusers' "trailing" DDIM).
Deterministic solvers are compared pixel by pixel with the exact flow; stochastic ones
by the output's mean and variance against the process they discretise (the reverse
SDE, DDIM(eta)'s eta-family member, or for a PC sampler, started at the marginal,
the data marginal at the end).

One compiled program per cell: a batch of four examples, ``N1`` and ``N2 = 2 N1``
steps (traced), each unmasked (a mask of ones) and masked (traced), so the order is
read from the error ratio of the two step counts of one run. The score is poisoned
(NaN) at sigma = 0 and reports every call there to the host, so a cell also fails
if any score evaluation at sigma = 0 happens, even one whose result is discarded.
"""

import concurrent.futures
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax.sampling import grids, predictors
from sdedit_jax.tools.gaussian_reference import (
    GaussianScore,
    data_marginal,
    flow_map,
    reverse_moments,
    sdedit_moments,
)

MU, S, T0, GUIDE = 0.3, 0.5, 0.5, 0.9
N1, N2 = 64, 128
SIDE = 128  # 16384 pixels per example (8192 editable when masked)
SDES = {
    "vp": sj.VPSDE(),
    "subvp": sj.SubVPSDE(),
    "ve": sj.VESDE(),
    "discrete_vp": sj.DiscreteVPSDE(),
    # Stable Diffusion's schedule (diffusers' scaled_linear, 0.00085..0.012).
    "sd_discrete_vp": sj.DiscreteVPSDE(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ),
}
# (predictor, eta, corrector): every predictor, DDIM at eta 0 and 0.5, and a PC sampler.
SOLVERS = [(name, 0.0, "none") for name in sj.PREDICTORS] + [
    ("ddim", 0.5, "none"),
    ("euler_maruyama", 0.0, "langevin"),
]


def _solver_id(solver):
    name, eta, corrector = solver
    return name + (f"-eta{eta}" if eta else "") + ("" if corrector == "none" else f"+{corrector}")


class _PoisonedScore(GaussianScore):
    """The exact score, NaN at sigma = 0, with each call's count of sigma = 0 times sent out."""

    def __call__(self, x, t):
        at_zero = self.sde.marginal_std(t) == 0
        if self.sde.noise_free_end:  # elsewhere sigma > 0 at every t >= eps (cheaper programs)
            jax.debug.callback(_ZERO_CALLS.append, jnp.sum(at_zero))
        poison = jnp.where(at_zero, jnp.nan, 0.0).reshape((-1,) + (1,) * (x.ndim - 1))
        return super().__call__(x, t) + poison


_ZERO_CALLS: list = []


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(sde, sampler, x, guides, mask, t0, n_steps, keys, known_noise):
    def keep_known(project_keys, x, t):
        # The known pixels' forward-perturbed guide, with fixed noise (a cheaper program;
        # the editable pixels never see it: the Gaussian score is elementwise).
        del project_keys
        mean, std = sde.marginal(guides, t)
        return mask * x + (1.0 - mask) * (mean + std * known_noise)

    t_end = jnp.full_like(t0, sde.eps)
    score = _PoisonedScore(sde, MU, S)
    return sj.integrate(sde, score, sampler, keys, x, t0, t_end, n_steps, keep_known)


def _inputs(sde, from_marginal=False):
    """One x at T0 for all four examples (each pair of step counts follows the same
    trajectories): from p(x_T0 | x_0 = GUIDE), SDEdit's start, or from the marginal p_T0
    (for PC samplers, whose Langevin moves target the marginals); masks: ones
    (unmasked) and a checkerboard."""
    t0 = jnp.full((4,), T0, jnp.float32)
    guides = jnp.full((4, SIDE, SIDE, 1), GUIDE, jnp.float32)
    z, known_noise = jax.random.normal(jax.random.key(5), (2, 1) + guides.shape[1:])
    if from_marginal:
        mean, std = data_marginal(sde, MU, S, T0)
    else:
        mean, std = sde.marginal(guides, t0)
    checker = (np.add.outer(np.arange(SIDE), np.arange(SIDE)) % 2).astype(np.float32)
    mask = np.ones((4, SIDE, SIDE, 1), np.float32)
    mask[2:, :, :, 0] = checker
    n_steps = jnp.asarray([N1, N2, N1, N2], jnp.int32)
    # RBG bits compile faster than threefry's; fold_in stays threefry's (sound streams).
    keys = jax.random.split(jax.random.key(6, impl="rbg"), 4)
    known_noise = jnp.broadcast_to(known_noise, guides.shape)
    x = jnp.broadcast_to(mean + std * z, guides.shape)
    return x, guides, jnp.asarray(mask), t0, n_steps, keys, known_noise


def _noisy_end(sde, grid, n_steps):
    """Where the integrator's grid ends before a noise-free end (see the module docstring)."""
    if grid == "uniform" and sde.noise_free_end:
        return max(T0 / n_steps, sde.last_noisy_time)
    return sde.last_noisy_time


def _final_data_map(sde, end):
    """(k, c): the exact data prediction ``x -> k x + c`` at time ``end`` (identity where
    the SDE's end has noise), for Gaussian data."""
    if not sde.noise_free_end:
        return 1.0, 0.0
    t = jnp.asarray([end])
    m = float(jnp.exp(sde.log_mean_coeff(t))[0])
    var = float(sde.marginal_var(t)[0])
    k = m * S**2 / (m**2 * S**2 + var)
    return k, MU - k * m * MU


def _reference_flow(sde, x_t0, end=None):
    end = sde.last_noisy_time if end is None else end
    k, c = _final_data_map(sde, end)
    return k * flow_map(sde, MU, S, x_t0, T0, end) + c


@functools.cache
def _reference_moments(sde, eta=1.0, end=None):
    """Output mean and variance of the reverse process DDIM(eta) approximates (eta = 1: the
    reverse SDE, what every other stochastic solver approximates)."""
    end = sde.last_noisy_time if end is None else end
    k, c = _final_data_map(sde, end)
    mean, var = reverse_moments(sde, MU, S, GUIDE, T0, end, eta)
    return k * mean + c, k**2 * var


def _reference_marginal(sde, end):
    k, c = _final_data_map(sde, end)
    mean, std = data_marginal(sde, MU, S, end)
    return k * mean + c, (k * std) ** 2


@pytest.mark.parametrize("sde_name", SDES)
def test_references_agree_and_end_where_the_exact_process_ends(sde_name):
    """The integrated moments agree with the closed forms (reverse SDE at eta = 1, the flow's
    push-forward at eta = 0), and a noise-free end's final data prediction is the exact
    process's end up to O(sigma_last^2)."""
    sde = SDES[sde_name]
    end = sde.last_noisy_time
    np.testing.assert_allclose(
        reverse_moments(sde, MU, S, GUIDE, T0, end),
        sdedit_moments(sde, MU, S, GUIDE, T0, end),
        rtol=1e-4,
    )
    m0, var0 = (
        float(v[0])
        for v in (
            jnp.exp(sde.log_mean_coeff(jnp.asarray([T0]))),
            sde.marginal_var(jnp.asarray([T0])),
        )
    )
    x = m0 * GUIDE + np.array([0.0, 1.0])
    flow = flow_map(sde, MU, S, x, T0, end)
    np.testing.assert_allclose(
        reverse_moments(sde, MU, S, GUIDE, T0, end, eta=0.0),
        (flow[0], (flow[1] - flow[0]) ** 2 * var0),
        rtol=1e-4,
    )
    x_t0 = m0 * MU + np.linspace(-1.5, 1.5, 7)
    exact = flow_map(sde, MU, S, x_t0, T0, sde.eps)
    sigma2_last = float(sde.marginal_var(jnp.asarray([end]))[0])
    np.testing.assert_allclose(  # O(sigma_last^2) as well
        _reference_flow(sde, x_t0), exact, rtol=0, atol=max(3e-4, 3 * sigma2_last)
    )
    mean, var = _reference_moments(sde)
    exact_mean, exact_var = sdedit_moments(sde, MU, S, GUIDE, T0, sde.eps)
    # The final data prediction's error is O(sigma_last^2 / S^2) (SD's beta_0 = 8.5e-4).
    np.testing.assert_allclose(
        [mean, var], [exact_mean, exact_var], rtol=max(2e-3, 1.5 * sigma2_last / S**2)
    )


def _order_ok(err1, err2, order, floor):
    """``err2``, at twice the steps, is smaller by the declared order within 50 % (an observed
    order above ``order - 0.6``), or at the floor (float32, sampling noise, knots)."""
    return err2 <= max(1.5 * err1 / 2**order, floor)


def _sampler(solver, grid):
    name, eta, corrector = solver
    return sj.Sampler(
        name, corrector, max_steps=N2, eta=eta, time_grid=grid, snr=0.05, denoise=False
    )


@functools.cache
def _inputs_of(sde_name, from_marginal):
    return _inputs(SDES[sde_name], from_marginal)


@functools.cache
def _outputs(solver):
    """{(grid, sde name): (output, score calls at sigma = 0)} for one solver.

    Compiling dominates (the runs take milliseconds): the solver's 12 programs compile
    on every core at once (XLA releases the GIL), then run one by one.
    """
    cells = [(grid, sde_name) for grid in sorted(grids.GRIDS) for sde_name in SDES]
    pc = solver[2] != "none"
    lowered = [
        _run.lower(SDES[sde_name], _sampler(solver, grid), *_inputs_of(sde_name, pc))
        for grid, sde_name in cells
    ]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        programs = list(pool.map(lambda program: program.compile(), lowered))
    results = {}
    for (grid, sde_name), program in zip(cells, programs, strict=True):
        _ZERO_CALLS.clear()
        out = np.asarray(program(*_inputs_of(sde_name, pc)))
        jax.effects_barrier()
        results[grid, sde_name] = out, int(sum(np.asarray(c) for c in _ZERO_CALLS))
    return results


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("grid", sorted(grids.GRIDS))
@pytest.mark.parametrize("solver", SOLVERS, ids=_solver_id)
@pytest.mark.slow
def test_finite_no_score_at_sigma_zero_and_converging_at_the_declared_order(solver, grid, sde_name):
    sde, (name, eta, corrector) = SDES[sde_name], solver
    solver_info = _sampler(solver, grid).solver
    order, stochastic = solver_info.order, solver_info.stochastic
    out, zero_calls = _outputs(solver)[grid, sde_name]
    x, guides, mask, t0, _, _, known_noise = _inputs_of(sde_name, corrector != "none")
    assert zero_calls == 0
    assert np.all(np.isfinite(out))
    editable = np.asarray(mask) > 0
    end_mean, end_std = (np.asarray(v) for v in sde.marginal(guides, t0 * 0 + sde.eps))
    np.testing.assert_allclose(
        out[~editable], (end_mean + end_std * np.asarray(known_noise))[~editable], atol=1e-6
    )
    if order == 0:  # the corrector-free "none" keeps its state: nothing converges
        return
    ends = [_noisy_end(sde, grid, n) for n in (N1, N2, N1, N2)]
    if stochastic:
        errors = []
        for b in range(4):
            if corrector != "none":  # from p_T0, every marginal-keeping process ends at p_eps
                mean, var = _reference_marginal(sde, ends[b])
            else:
                mean, var = _reference_moments(sde, eta if name == "ddim" else 1.0, ends[b])
            v = out[b][editable[b]]
            errors.append(max(abs(v.var() / var - 1), abs(v.mean() - mean) / np.sqrt(var)))
        floors = [4 * np.sqrt(2.0 / editable[b].sum()) for b in range(4)]  # 4 s.e.
    else:
        errors = [
            np.max(np.abs(out[b] - _reference_flow(sde, np.asarray(x[b]), ends[b]))[editable[b]])
            for b in range(4)
        ]
        floors = [2e-5] * 4
        if sde_name == "discrete_vp" and name in predictors.PREDICTORS:
            # Runge-Kutta in t meets DDPM's piecewise-constant beta(t) at every knot: first
            # order there, down to the knots' own error (the exponential integrators, exact
            # in the linear part, keep their order).
            order, floors = min(order, 1), [1e-3] * 4
        if grid == "uniform" and sde.noise_free_end:
            # The even steps t0 k / n reach the data: their last few have n-independent
            # log-SNR lengths (sigma^2 ~ t near 0, so log((k + 1) / k) / 2), a first-order
            # terminal layer for every solver (measured: DPM-Solver++(2M) on SD's schedule
            # halves its error per doubling, 64 to 512 steps). DDIM, the grid's purpose, is
            # first order anyway; the log-SNR grids keep the higher orders.
            order = min(order, 1)
    # Unmasked (examples 0, 1) and masked (2, 3), each at N1 and N2 steps.
    for n1, n2 in ((0, 1), (2, 3)):
        assert _order_ok(errors[n1], errors[n2], order, floors[n2]), errors


@pytest.mark.parametrize(
    "predictor,corrector,corrector_steps,vp_calls,discrete_calls",
    [
        ("ode_heun", "none", 1, 10, 9),  # the final step: one data prediction, no Heun pair
        ("sde_dpm_solver_2m", "langevin", 2, 15, 15),  # 2 corrector calls + 1 per step
        ("none", "langevin", 1, 5, 6),  # corrector-only, plus the final data prediction
    ],
)
@pytest.mark.slow
def test_network_calls_are_the_score_calls_made(
    predictor, corrector, corrector_steps, vp_calls, discrete_calls
):
    """Counted at run time over 5 steps: ``Sampler.network_calls`` is what the loop and its
    final step call."""
    sampler = sj.Sampler(
        predictor, corrector, max_steps=8, corrector_steps=corrector_steps, time_grid="uniform"
    )
    run = jax.jit(sj.integrate, static_argnums=(0, 1, 2))
    for sde, expected in ((SDES["vp"], vp_calls), (SDES["discrete_vp"], discrete_calls)):
        calls = []

        def counting_score(x, t, calls=calls):
            jax.debug.callback(lambda: calls.append(1))
            return -x

        ones = jnp.ones((1,))
        jax.block_until_ready(
            run(
                sde,
                counting_score,
                sampler,
                jax.random.split(jax.random.key(0), 1),
                jnp.ones((1, 4)),
                0.5 * ones,
                sde.eps * ones,
                jnp.full((1,), 5, jnp.int32),
            )
        )
        jax.effects_barrier()
        assert len(calls) == sampler.network_calls(5, sde.noise_free_end) == expected
