"""Integrators against closed-form Gaussian truth."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax.sampling.correctors import langevin
from sdedit_jax.tools.gaussian_reference import GaussianScore, flow_map

MU, S = 0.3, 0.5
SDES = {"vp": sj.VPSDE(), "subvp": sj.SubVPSDE(), "ve": sj.VESDE(sigma_max=20.0)}
SAMPLERS = {
    "euler_maruyama": sj.Sampler("euler_maruyama", max_steps=1000),
    "reverse_diffusion": sj.Sampler("reverse_diffusion", max_steps=1000),
    "ancestral": sj.Sampler("ancestral", max_steps=1000),
    "ode_euler": sj.Sampler("ode_euler", max_steps=1000),
    "ode_heun": sj.Sampler("ode_heun", max_steps=300),
    "pc_reverse_diffusion_langevin": sj.Sampler(
        "reverse_diffusion", "langevin", max_steps=1000, snr=0.05
    ),
    "pc_euler_maruyama_langevin": sj.Sampler(
        "euler_maruyama", "langevin", max_steps=1000, snr=0.05, corrector_steps=2
    ),
}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(sde, sampler, shape, keys):
    return sj.sample_prior(sde, GaussianScore(sde, MU, S), sampler, keys, shape)


@pytest.mark.parametrize("sampler_name", SAMPLERS)
@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.slow
def test_prior_samples_match_data_distribution(sde_name, sampler_name):
    """32768 pixels: mean s.e. 0.003, std s.e. 0.4%; tolerances add discretisation bias."""
    keys = jax.random.split(jax.random.key(7), 128)
    x = np.asarray(_sample(SDES[sde_name], SAMPLERS[sampler_name], (128, 16, 16, 1), keys))
    assert np.all(np.isfinite(x))
    assert abs(x.mean() - MU) < 0.015, x.mean()
    assert abs(x.std() / S - 1) < 0.03, x.std()


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_ode_solvers_converge_at_their_order(sde_name):
    """Error vs the exact flow map shrinks ~2x (Euler) and ~4x (Heun) per halved step."""
    sde = SDES[sde_name]
    x0 = jnp.linspace(-2.0, 2.0, 8).reshape(8, 1, 1, 1) * sde.prior_std
    t_start, t_end = jnp.full((8,), 1.0), jnp.full((8,), 0.05)
    exact = flow_map(sde, MU, S, x0, 1.0, 0.05)
    keys = jax.random.split(jax.random.key(0), 8)

    def error(predictor, n):
        sampler = sj.Sampler(predictor, max_steps=n, denoise=False)
        run = jax.jit(sj.integrate, static_argnums=(0, 1, 2))
        out = run(sde, GaussianScore(sde, MU, S), sampler, keys, x0, t_start, t_end)
        return float(jnp.max(jnp.abs(out - exact)))

    for predictor, order in (("ode_euler", 1), ("ode_heun", 2)):
        errors = [error(predictor, n) for n in (64, 128, 256)]
        rates = [np.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
        assert all(abs(r - order) < 0.3 for r in rates), (predictor, errors, rates)


@pytest.mark.slow
def test_langevin_keeps_the_marginal_and_ignores_batch_mates():
    """Started at p_t, Langevin with the exact score stays at p_t (bias ~ snr^2 / 2)."""
    sde = SDES["vp"]
    score = GaussianScore(sde, MU, S)
    t = jnp.full((64,), 0.5)
    mean = np.exp(float(sde.log_mean_coeff(t)[0])) * MU
    std = np.sqrt(
        np.exp(2 * float(sde.log_mean_coeff(t)[0])) * S**2 + float(sde.marginal_std(t)[0]) ** 2
    )
    keys = jax.random.split(jax.random.key(3), 64)
    x = mean + std * jax.random.normal(jax.random.key(4), (64, 16, 16, 1))
    run = jax.jit(functools.partial(langevin, snr=0.05, n_steps=40), static_argnums=(0, 1))
    out, _ = run(sde, score, keys, x, t, jnp.full((64,), 1e-3))
    out = np.asarray(out)
    assert abs(out.mean() - mean) < 0.01
    assert abs(out.std() / std - 1) < 0.02
    # An example scaled up 100x changes its own step size only.
    x_odd = x.at[0].multiply(100.0)
    out_odd, _ = run(sde, score, keys, x_odd, t, jnp.full((64,), 1e-3))
    np.testing.assert_array_equal(np.asarray(out_odd)[1:], out[1:])


def test_sampler_rejects_bad_values():
    with pytest.raises(ValueError, match="predictor: unknown name 'heun'"):
        sj.Sampler("heun")
    with pytest.raises(ValueError, match="corrector"):
        sj.Sampler(corrector="hmc")
    with pytest.raises(ValueError, match="max_steps"):
        sj.Sampler(max_steps=0)
