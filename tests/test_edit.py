"""SDEdit against the closed-form output distribution for Gaussian data."""

import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax.tools.gaussian_reference import GaussianScore, sdedit_moments

MU, S = 0.3, 0.5
T0S = (0.2, 0.5, 0.8)
GUIDE_VALUES = (-0.8, 0.0, 0.9)
PER_SETTING, SIDE = 16, 32
N_PIXELS = PER_SETTING * SIDE * SIDE


def _settings():
    """Every (t0, guide value), PER_SETTING examples each, mixed in one batch."""
    t0, g = np.meshgrid(T0S, GUIDE_VALUES, indexing="ij")
    t0 = np.repeat(t0.ravel(), PER_SETTING).astype(np.float32)
    g = np.repeat(g.ravel(), PER_SETTING).astype(np.float32)
    guides = np.broadcast_to(g[:, None, None, None], (len(g), SIDE, SIDE, 1)).copy()
    return t0, g, guides


def _check_moments(sde, out, t0, g, guide_var_fn=lambda t0, g: 0.0, repeats=1):
    for t in T0S:
        for value in GUIDE_VALUES:
            rows = (t0 == np.float32(t)) & (g == np.float32(value))
            x = out[rows].ravel()
            mean, var = value, guide_var_fn(t, value)
            for _ in range(repeats):
                mean, var = sdedit_moments(sde, MU, S, mean, t, sde.eps, guide_var=var)
            se = np.sqrt(var / x.size)
            assert abs(x.mean() - mean) < 5 * se + 5e-3, (t, value, x.mean(), mean)
            assert abs(x.var() / var - 1) < 5 * np.sqrt(2 / x.size) + 0.02, (t, value)


@pytest.mark.parametrize("sde", [sj.VPSDE(), sj.VESDE(sigma_max=20.0)], ids=["vp", "ve"])
@pytest.mark.slow
def test_output_distribution_matches_closed_form(sde):
    t0, g, guides = _settings()
    out = np.asarray(
        sj.sdedit(GaussianScore(sde, MU, S), sde, guides, seed=1, t0=t0, n_steps=500, denoise=False)
    )
    _check_moments(sde, out, t0, g)


def test_faithfulness_grows_with_t0_as_predicted():
    """E||x - guide||^2 per pixel = var + (mean - guide)^2, increasing in t0."""
    sde = sj.VPSDE()
    t0, g, guides = _settings()
    out = np.asarray(
        sj.sdedit(GaussianScore(sde, MU, S), sde, guides, seed=2, t0=t0, n_steps=500, denoise=False)
    )
    value = GUIDE_VALUES[2]
    measured, predicted = [], []
    for t in T0S:
        rows = (t0 == np.float32(t)) & (g == np.float32(value))
        measured.append(float(np.mean((out[rows] - value) ** 2)))
        mean, var = sdedit_moments(sde, MU, S, value, t, sde.eps)
        predicted.append(float(var + (mean - value) ** 2))
    np.testing.assert_allclose(measured, predicted, rtol=0.05)
    assert predicted == sorted(predicted) and measured == sorted(measured)


def test_masked_edit_keeps_outside_and_edits_inside():
    sde = sj.VPSDE()
    t0, g, guides = _settings()
    rng = np.random.default_rng(0)
    mask = (rng.random(guides.shape) < 0.5).astype(np.float32)
    out = np.asarray(
        sj.sdedit(
            GaussianScore(sde, MU, S),
            sde,
            guides,
            seed=3,
            t0=t0,
            mask=mask,
            n_steps=500,
            denoise=False,
        )
    )
    np.testing.assert_array_equal(out[mask == 0], guides[mask == 0])
    # Inside, pixels are independent under this elementwise score: unmasked closed form.
    inside = np.where(mask == 1, out, np.nan)
    for t in T0S:
        for value in GUIDE_VALUES:
            rows = (t0 == np.float32(t)) & (g == np.float32(value))
            x = inside[rows].ravel()
            x = x[~np.isnan(x)]
            mean, var = sdedit_moments(sde, MU, S, value, t, sde.eps)
            assert abs(x.mean() - mean) < 5 * np.sqrt(var / x.size) + 5e-3
            assert abs(x.var() / var - 1) < 5 * np.sqrt(2 / x.size) + 0.02


def test_repeats_chain_perturb_and_denoise_cycles():
    """K = 2: the second cycle starts from the first's (random) output."""
    sde = sj.VPSDE()
    t0, g, guides = _settings()
    out = np.asarray(
        sj.sdedit(
            GaussianScore(sde, MU, S),
            sde,
            guides,
            seed=4,
            t0=t0,
            n_steps=300,
            repeats=2,
            denoise=False,
        )
    )
    _check_moments(sde, out, t0, g, repeats=2)
