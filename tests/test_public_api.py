"""The package's public face: what the README uses is importable from ``sdedit_jax``, and a
loaded model exposes its network so tools need not take the score function apart.

Truth: the declared solver/corrector/grid registries, the README's step rule
(N = 500, t0 = 0.5 -> 250 steps) and the noise-prediction score s = -eps / std(t).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax.sampling import correctors, grids, sampler


def test_the_readme_names_are_exported():
    for name in (
        "load_model",
        "load_network",
        "paper_steps",
        "sdedit",
        "Sampler",
        "VPSDE",
        "SubVPSDE",
        "VESDE",
        "Editor",
        "LoadedModel",
    ):
        assert hasattr(sj, name) and name in sj.__all__, name
    assert set(sj.PREDICTORS) == set(sampler.SOLVERS)
    assert {"sde_dpm_solver_2m", "dpm_solver_2m", "ddim", "ancestral"} <= set(sj.PREDICTORS)
    assert set(sj.CORRECTORS) == set(correctors.CORRECTORS)
    assert set(sj.TIME_GRIDS) == set(grids.GRIDS)
    np.testing.assert_array_equal(sj.paper_steps(500, np.array([0.5, 0.3])), [250, 150])
    for predictor in sj.PREDICTORS:  # every exported name builds a sampler
        sj.Sampler(predictor, max_steps=4)


def test_loaded_model_exposes_its_network():
    model = sj.load_model()
    assert model.parameterization == "noise"
    x = jax.random.normal(jax.random.key(0), (2, model.image_size, model.image_size, 3))
    t = jnp.array([0.3, 0.7])
    net = model.network()
    eps = net(x, t, train=False)  # the shipped U-Net is conditioned on t (sinusoidal)
    expected = -eps / model.sde.marginal_std(t)[:, None, None, None]
    np.testing.assert_allclose(model.score_fn(x, t), expected, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(model.state) == jax.tree.structure(model.score_fn.args[0])


def test_a_score_without_a_network_says_so():
    model = sj.LoadedModel(lambda x, t: x, sj.VPSDE(), 8, 3, "", "closed_form")
    with pytest.raises(ValueError, match="closed_form: this model has no network"):
        model.network()


@pytest.mark.parametrize("load", [sj.load_model, sj.load_network])
def test_a_misspelt_checkpoint_option_is_refused(load):
    # The options are one typed dict shared by both loaders; a typo must not be ignored.
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['imagesize'\]"):
        load(None, imagesize=32)
