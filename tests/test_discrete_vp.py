"""DiscreteVPSDE: DDPM's discrete schedule inside the continuous-time engine.

The truth is DDPM/SDEdit's own arithmetic in float64 numpy: ``betas =
linspace(1e-4, 0.02, 1000)``, ``alphas_cumprod = (1 - betas).cumprod()``, the
ancestral step with ``beta`` and ``beta_tilde``, and ermongroup/SDEdit's
editing loop (start from ``a[K-1]``, model timesteps ``K-1 .. 0``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdedit_jax import edit, engine, rng
from sdedit_jax.sampling import predictors
from sdedit_jax.sampling.integrate import integrate as sj_integrate
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.score import make_score_fn
from sdedit_jax.sde import SDES, VPSDE, DiscreteVPSDE, sde_from_config

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
ALPHAS_CUMPROD_PREV = np.append(1.0, ALPHAS_CUMPROD[:-1])
BETA_TILDE = BETAS * (1.0 - ALPHAS_CUMPROD_PREV) / (1.0 - ALPHAS_CUMPROD)


@pytest.mark.slow
def test_grid_marginals_are_ddpms_alphas_cumprod():
    sde = DiscreteVPSDE()
    n = np.arange(T)
    t = jnp.asarray((n + 1) / T, jnp.float32)
    alpha_bar = np.exp(2.0 * np.asarray(sde.log_mean_coeff(t), np.float64))
    np.testing.assert_allclose(alpha_bar, ALPHAS_CUMPROD, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sde.marginal_var(t)), 1.0 - ALPHAS_CUMPROD, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(sde.timestep(t)), n.astype(np.float32))
    assert float(sde.marginal_var(jnp.zeros(1))[0]) == 0.0 and sde.eps == 0.0


def test_continuous_between_grid_times_with_consistent_drift_and_diffusion():
    sde = DiscreteVPSDE()
    # log alpha_bar is linear inside a step: the midpoint is the mean of the ends.
    n = np.arange(1, T - 1)
    ends = [
        np.asarray(sde.log_mean_coeff(jnp.asarray((n + d) / T, jnp.float32)))
        for d in (0.0, 0.5, 1.0)
    ]
    np.testing.assert_allclose(ends[1], 0.5 * (ends[0] + ends[2]), rtol=1e-5, atol=1e-7)
    # Drift is d log m / dt of the marginal mean, and for VP (var = 1 - m^2) the diffusion
    # must be g^2 = -2 f; together they give d var/dt = 2 f var + g^2.
    t = jnp.asarray((n + 0.3) / T, jnp.float32)
    h = 0.2 / T
    dlogm = (
        np.asarray(sde.log_mean_coeff(t + h), np.float64)
        - np.asarray(sde.log_mean_coeff(t - h), np.float64)
    ) / (2 * h)
    np.testing.assert_allclose(dlogm, np.asarray(sde.drift_coeff(t)), rtol=2e-3)
    np.testing.assert_allclose(
        np.asarray(sde.diffusion(t)) ** 2, -2.0 * np.asarray(sde.drift_coeff(t)), rtol=1e-6
    )
    # The step's diffusion is DDPM's beta in the small-step sense: g^2 / T = -log(1 - beta).
    np.testing.assert_allclose(
        np.asarray(sde.diffusion(t)) ** 2 / T, -np.log1p(-BETAS[n]), rtol=1e-5
    )


@pytest.mark.slow
def test_ancestral_step_of_one_over_T_is_ddpms_step():
    sde = DiscreteVPSDE()
    n = np.array([0, 1, 7, 250, 500, 998, 999])
    t = jnp.asarray((n + 1) / T, jnp.float32)
    dt = jnp.full(t.shape, 1.0 / T, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (len(n), 4, 4, 3))
    eps_hat = jax.random.normal(jax.random.key(1), x.shape)  # a fixed "network output"

    def score_fn(x_, t_):
        return -eps_hat / jnp.sqrt(sde.marginal_var(t_))[:, None, None, None]

    keys = jax.random.split(jax.random.key(2), len(n))
    x_next, x_mean = predictors.ancestral(sde, score_fn, keys, x, t, dt)

    xb, eb = np.asarray(x, np.float64), np.asarray(eps_hat, np.float64)
    b = BETAS[n][:, None, None, None]
    mean = (xb - b / np.sqrt(1 - ALPHAS_CUMPROD[n])[:, None, None, None] * eb) / np.sqrt(1 - b)
    noise = np.asarray(rng.example_noise(keys, x), np.float64)
    expected = mean + np.sqrt(BETA_TILDE[n])[:, None, None, None] * noise
    np.testing.assert_allclose(np.asarray(x_mean), mean, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(x_next), expected, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(x_next)[0], np.asarray(x_mean)[0])  # n=0: no noise

    a, v = sde.transition(t, t - dt)
    np.testing.assert_allclose(np.asarray(a), np.sqrt(1 - BETAS[n]), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(v), BETAS[n], rtol=2e-6)


class _FakeEps(nnx.Module):
    """A stand-in noise network whose output depends on x and on the timestep input."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(0.3))

    def __call__(self, x, timesteps, cond=None, *, train=False):
        return self.w[...] * jnp.tanh(x) + 1e-3 * timesteps.reshape(-1, 1, 1, 1) * jnp.cos(x)


def _fake_eps_np(x, n):
    return 0.3 * np.tanh(x) + 1e-3 * n * np.cos(x)


@pytest.mark.parametrize("total_noise_levels", [1, 7, 400])
@pytest.mark.slow
def test_engine_runs_sdedits_ddpm_loop(total_noise_levels):
    """ermongroup/SDEdit with ``--t K``: x = sqrt(a[K-1]) x0 + sqrt(1-a[K-1]) e, then DDPM
    steps at timesteps K-1..0. The engine with t0 = K/T and its paper step count does that."""
    k = total_noise_levels
    sde = DiscreteVPSDE()
    t0 = k / T
    steps = int(engine.paper_steps(T, np.float32(t0)))
    assert steps == k
    model = _FakeEps()
    graphdef, state = nnx.split(model)
    score_fn = make_score_fn(graphdef, state, sde, "noise", "timestep")
    guides = jax.random.uniform(jax.random.key(3), (2, 4, 4, 3), minval=-1, maxval=1)
    keys = jax.random.split(jax.random.key(4), 2)
    sampler = Sampler(predictor="ancestral", max_steps=engine.step_bucket(k))
    out = edit.sdedit_batch(
        score_fn,
        sde,
        sampler,
        guides,
        keys,
        jnp.full((2,), t0, jnp.float32),
        jnp.full((2,), k, jnp.int32),
    )

    # The reference loop, in float64, with the engine's noise draws.
    repeat_keys = rng.fold_in(keys, 0)
    e = np.asarray(rng.example_noise(rng.fold_in(repeat_keys, 0), guides), np.float64)
    step_keys = rng.fold_in(repeat_keys, 1)
    a = ALPHAS_CUMPROD
    x0 = np.asarray(guides, np.float64)
    x = x0 * np.sqrt(a[k - 1]) + e * np.sqrt(1.0 - a[k - 1])
    for j, i in enumerate(reversed(range(k))):
        mean = (x - BETAS[i] / np.sqrt(1 - a[i]) * _fake_eps_np(x, i)) / np.sqrt(1 - BETAS[i])
        z = np.asarray(rng.example_noise(rng.fold_in(rng.fold_in(step_keys, j), 1), guides))
        x = mean + (i > 0) * np.sqrt(BETA_TILDE[i]) * z
    np.testing.assert_allclose(np.asarray(out), x, atol=5e-5)


def test_registered_and_configurable_and_others_unchanged():
    assert SDES["discrete_vp"] is DiscreteVPSDE
    sde = sde_from_config(
        {"name": "discrete_vp", "beta_start": 1e-4, "beta_end": 0.02, "num_timesteps": 1000}
    )
    assert sde == DiscreteVPSDE() and hash(sde) == hash(DiscreteVPSDE())
    assert dataclasses.asdict(VPSDE()) == {"beta_min": 0.1, "beta_max": 20.0, "eps": 1e-3}
    with pytest.raises(ValueError, match="num_timesteps: must be an int >= 2, got 0"):
        DiscreteVPSDE(num_timesteps=0)
    with pytest.raises(ValueError, match=r"beta_start, beta_end: need 0 < beta_start <= beta_end"):
        DiscreteVPSDE(beta_start=0.1, beta_end=0.01)


def test_scaled_linear_is_stable_diffusions_schedule():
    """diffusers' ``scaled_linear`` betas (linear in sqrt(beta), SD's 0.00085..0.012):
    the grid marginals are their ``alphas_cumprod``, in closed form and per diffusers."""
    sd = DiscreteVPSDE(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    t = jnp.asarray((np.arange(T) + 1) / T, jnp.float32)
    alpha_bar = np.exp(2.0 * np.asarray(sd.log_mean_coeff(t), np.float64))
    np.testing.assert_allclose(alpha_bar, np.cumprod(1.0 - betas), rtol=1e-6)
    assert sde_from_config({"name": "discrete_vp", **dataclasses.asdict(sd)}) == sd
    with pytest.raises(ValueError, match="beta_schedule: must be one of"):
        DiscreteVPSDE(beta_schedule="cosine")
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    np.testing.assert_allclose(alpha_bar, scheduler.alphas_cumprod.numpy(), rtol=2e-6)


def test_a_diffusers_scheduler_names_the_schedule_and_ddpm_records_stay_as_they_were(tmp_path):
    import json

    from sdedit_jax.importers import diffusers as diffusers_import

    def sde_of(schedule: dict) -> dict:
        (tmp_path / "scheduler_config.json").write_text(json.dumps(schedule))
        return diffusers_import.ddpm_sde(str(tmp_path))

    sd = sde_of({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    assert sde_from_config(sd) == DiscreteVPSDE(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    assert "beta_schedule" not in sde_of({"beta_schedule": "linear"})  # DDPM folders unchanged
    with pytest.raises(ValueError, match="beta_schedule: 'squaredcos_cap_v2' is not supported"):
        sde_of({"beta_schedule": "squaredcos_cap_v2"})


def _timesteps_called(sde, sampler, t0: float, n_steps: int) -> list[float]:
    """The network timesteps (``t T - 1``) of every score call of one integration."""
    calls = []

    def recording_score(x, t):
        jax.debug.callback(lambda ts: calls.append(float(ts[0])), sde.timestep(t))
        return -x

    ones = jnp.ones((1,))
    jax.block_until_ready(
        jax.jit(sj_integrate, static_argnums=(0, 1, 2))(
            sde, recording_score, sampler, jax.random.split(jax.random.key(0), 1),
            jnp.ones((1, 4)), t0 * ones, sde.eps * ones, jnp.full((1,), n_steps, jnp.int32),
        )
    )  # fmt: skip
    jax.effects_barrier()
    return calls


@pytest.mark.parametrize("strength,inference_steps", [(0.6, 10), (0.75, 20), (1.0, 4), (0.3, 50)])
def test_uniform_steps_from_t0_are_diffusers_trailing_ddim_timesteps(strength, inference_steps):
    """img2img's ``strength`` is t0 and its ``int(num_inference_steps * strength)`` steps
    are ``n_steps``: the uniform grid reaches the data in even steps whose network times
    are diffusers' DDIM timesteps with ``timestep_spacing="trailing"`` (``steps_offset=0``),
    the last one predicting the data as ``set_alpha_to_one=True`` does."""
    diffusers = pytest.importorskip("diffusers")
    sde = DiscreteVPSDE(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
    )  # fmt: skip
    scheduler.set_timesteps(inference_steps)
    n_steps = int(inference_steps * strength)
    expected = scheduler.timesteps.numpy()[inference_steps - n_steps :].tolist()
    sampler = Sampler(predictor="ddim", max_steps=64, time_grid="uniform")
    np.testing.assert_allclose(
        _timesteps_called(sde, sampler, strength, n_steps), expected, atol=1e-3
    )


def test_more_steps_than_timesteps_never_call_below_ddpms_first_step():
    sde = DiscreteVPSDE()
    sampler = Sampler(predictor="ddim", max_steps=64, time_grid="uniform")
    called = _timesteps_called(sde, sampler, 0.01, 40)  # t0 = 10 / T, 40 steps
    assert len(called) == 40 and min(called) > -1e-3 and called[-1] == pytest.approx(0.0)
