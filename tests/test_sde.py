"""SDE definitions against their defining equations and score_sde's closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdedit_jax as sj

SDES = {
    "vp": sj.VPSDE(),
    "subvp": sj.SubVPSDE(),
    "ve": sj.VESDE(sigma_max=50.0),
}
TIMES = jnp.linspace(0.01, 1.0, 23)


@pytest.mark.parametrize("name", SDES)
def test_mean_coefficient_follows_drift(name):
    """d log m / dt equals the linear drift coefficient."""
    sde = SDES[name]
    dlogm = jax.vmap(jax.grad(lambda t: sde.log_mean_coeff(t)))(TIMES)
    np.testing.assert_allclose(dlogm, sde.drift_coeff(TIMES), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SDES)
def test_variance_follows_fokker_planck(name):
    """For a linear SDE the kernel variance obeys d var/dt = 2 f var + g^2."""
    sde = SDES[name]
    dvar = jax.vmap(jax.grad(lambda t: sde.marginal_std(t) ** 2))(TIMES)
    var = sde.marginal_std(TIMES) ** 2
    expected = 2 * sde.drift_coeff(TIMES) * var + sde.diffusion(TIMES) ** 2
    np.testing.assert_allclose(dvar, expected, rtol=2e-4, atol=1e-5)


def test_closed_forms_match_score_sde():
    """Reference values of VP / sub-VP / VE marginals (Song et al.'s formulas)."""
    t = jnp.array([0.3, 0.7])
    lmc = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1
    np.testing.assert_allclose(sj.VPSDE().marginal_std(t), np.sqrt(1 - np.exp(2 * lmc)), 1e-6)
    np.testing.assert_allclose(sj.SubVPSDE().marginal_std(t), 1 - np.exp(2 * lmc), 1e-6)
    np.testing.assert_allclose(
        sj.VESDE(sigma_max=50.0).marginal_std(t), 0.01 * (50 / 0.01) ** t, rtol=1e-5
    )


@pytest.mark.parametrize("name", SDES)
def test_transitions_compose(name):
    """Kernels chain: (r -> s) then (s -> t) equals (r -> t)."""
    sde = SDES[name]
    r, s, t = jnp.array([0.1]), jnp.array([0.4]), jnp.array([0.9])
    a1, v1 = sde.transition(s, r)
    a2, v2 = sde.transition(t, s)
    a, v = sde.transition(t, r)
    np.testing.assert_allclose(a1 * a2, a, rtol=1e-5)
    np.testing.assert_allclose(a2**2 * v1 + v2, v, rtol=1e-4)


def test_vp_discretisation_is_ddpm():
    """VP's one-step kernel is DDPM's: f = (sqrt(1 - beta) - 1) x, G = sqrt(beta)."""
    sde = sj.VPSDE()
    t, dt = jnp.array([0.5]), jnp.array([1e-3])
    x = jnp.ones((1, 2, 2, 1))
    f, big_g = sde.discretize(x, t, dt)
    beta = 1 - np.exp(
        -(sde.beta_min * dt + 0.5 * (sde.beta_max - sde.beta_min) * (t**2 - (t - dt) ** 2))
    )
    np.testing.assert_allclose(f[0, 0, 0, 0], np.sqrt(1 - beta[0]) - 1, rtol=1e-4)
    np.testing.assert_allclose(big_g[0, 0, 0, 0], np.sqrt(beta[0]), rtol=1e-4)


@pytest.mark.parametrize("name", SDES)
def test_perturb_matches_marginal(name):
    sde = SDES[name]
    keys = jax.random.split(jax.random.key(0), 4096)
    x0 = jnp.full((4096, 1, 1, 1), 0.7)
    t = jnp.full((4096,), 0.4)
    xt = np.asarray(sde.perturb(keys, x0, t)).ravel()
    mean, std = sde.marginal(x0[:1], t[:1])
    assert abs(xt.mean() - float(mean.ravel()[0])) < 4 * float(std.ravel()[0]) / 64
    assert abs(xt.std() / float(std.ravel()[0]) - 1) < 0.05
