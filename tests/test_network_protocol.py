"""The one network protocol: ``net(x, t, cond=None, *, train=False)``, one Architecture
per family, one score wrapper, and ``cond`` carried per example through the edit."""

import inspect
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sdedit_jax as sj
from sdedit_jax import engine, pretrained, score
from sdedit_jax.importers import diffusers_sd
from sdedit_jax.models import sd_unet
from sdedit_jax.models.architectures import ARCHITECTURES
from tests import sd_reference

SDE = sj.VPSDE()
SPREAD = 0.05  # std of each example's data around its own mean


class _ConditionalGaussian(nnx.Module):
    """The exact score of data ``N(mu, SPREAD^2 I)`` with ``mu = cond["mean"]`` per example.

    Under the VP SDE ``x_t ~ N(a mu, (a^2 SPREAD^2 + s^2) I)``, so the score is
    ``-(x - a mu) / (a^2 SPREAD^2 + s^2)``: a network of the protocol whose output
    depends on its conditioning, independently of any learned weights.
    """

    def __init__(self):
        self.spread = nnx.Param(jnp.float32(SPREAD))

    def __call__(self, x, t, cond=None, *, train=False):
        a, s = SDE.marginal(jnp.ones_like(t), t)
        inv_var = 1.0 / (a**2 * self.spread**2 + s**2)
        mean = a[:, None] * cond["mean"]  # [B, C]
        return -(x - mean[:, None, None, :]) * inv_var[:, None, None, None]


def _conditional_score_fn():
    graphdef, state = nnx.split(_ConditionalGaussian())
    return score.make_score_fn(graphdef, state, SDE, "score", "t")


def test_a_conditional_score_gets_each_examples_own_cond_sharded_as_unsharded():
    n = 16  # two rows on each of the 8 devices
    rng = np.random.default_rng(0)
    guides = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
    means = np.stack([np.linspace(-0.75, 0.75, n)] * 3, axis=1).astype(np.float32)
    means[:, 1] *= -1.0  # channels differ, so a transposed cond would show too
    cond = {"mean": rng.permutation(means)}
    kw = dict(t0=1.0, n_steps=40, per_device_batch=2, predictor="euler_maruyama")
    fn = _conditional_score_fn()
    sharded = np.asarray(sj.sdedit(fn, SDE, guides, cond=cond, **kw))
    assert len(jax.devices()) == 8
    # From t0 = T the edit samples each example's own Gaussian: its pixel mean is its
    # cond's mean (the neighbours' means lie 0.1 away; a pixel mean's error is ~0.006).
    np.testing.assert_allclose(sharded.mean(axis=(1, 2)), cond["mean"], atol=0.03)
    alone = sj.sdedit(fn, SDE, guides, cond=cond, mesh=engine.data_mesh(jax.devices()[:1]), **kw)
    np.testing.assert_array_equal(np.asarray(alone), sharded)
    # Rows are independent of their batch: a reordered subset gives the same rows.
    order = np.array([13, 2, 7])
    subset = sj.sdedit(
        fn, SDE, guides[order], example_ids=order, cond={"mean": cond["mean"][order]}, **kw
    )
    np.testing.assert_array_equal(np.asarray(subset), sharded[order])


def test_cond_without_one_row_per_guide_is_refused_by_name():
    guides = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"cond\['mean'\]: expected a leading axis of 4"):
        sj.sdedit(_conditional_score_fn(), SDE, guides, cond={"mean": np.zeros((3, 3))})


def _network(name):
    architecture = ARCHITECTURES[name]
    return nnx.merge(*architecture.abstract(architecture.config_class()))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_is_called_the_same_way(name):
    architecture = ARCHITECTURES[name]
    assert pretrained.ARCHITECTURES[name] is architecture and architecture.name == name
    params = inspect.signature(type(_network(name)).__call__).parameters
    assert list(params)[:4] == ["self", "x", "t", "cond"]
    assert params["cond"].default is None
    assert params["train"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["train"].default is False
    side, channels = architecture.image_shape(architecture.config_class())
    assert isinstance(side, int) and isinstance(channels, int)


@pytest.mark.parametrize("name", ["unet", "ddpm_unet", "ncsnpp"])
def test_unconditional_networks_refuse_a_cond_instead_of_dropping_it(name):
    x = jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match=f"cond: the {name} network takes no conditioning"):
        _network(name)(x, jnp.ones(2), {"text": jnp.zeros((2, 4, 8))})


def test_unet_folder_condition_comes_from_its_config(tiny_model_dir, tmp_path):
    """Old unet folders record no condition: the config's time embedding decides it."""
    model = pretrained.load_model(tiny_model_dir)
    assert set(model.description) == {"architecture", "config", "sde", "parameterization"}
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    t = jnp.array([0.2, 0.7])
    eps = model.network()(x, t, train=False)  # sinusoidal: the time input is t itself
    expected = -eps / SDE.marginal_std(t)[:, None, None, None]
    np.testing.assert_allclose(model.score_fn(x, t), expected, rtol=1e-5, atol=1e-5)
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    info = json.loads((folder / "model_info.json").read_text())
    (folder / "model_info.json").write_text(json.dumps({**info, "condition": "t"}))
    assert pretrained.load_model(str(folder)).description == model.description
    (folder / "model_info.json").write_text(json.dumps({**info, "condition": "sigma"}))
    with pytest.raises(ValueError, match="field 'condition' is 'sigma', but architecture 'unet'"):
        pretrained.load_model(str(folder))


@pytest.mark.slow
def test_load_network_maps_z_t_h_onto_the_latent_networks_call():
    config = diffusers_sd.unet_config(sd_reference.UNET_SD1)
    graphdef, state = nnx.split(sd_unet.build(config, seed=0))
    network = pretrained.Network("sd_unet", config, graphdef, state)
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    h = rng.normal(size=(2, 5, 32)).astype(np.float32)
    t = np.array([10.0, 500.0], np.float32)
    direct = jax.jit(lambda s, z, t, h: nnx.merge(graphdef, s)(z, t, {"text": h}))(state, z, t, h)
    np.testing.assert_array_equal(np.asarray(network(z, t, h)), np.asarray(direct))
    other = network(z, t, {"text": h[::-1]})  # the conditioning is used, per example
    assert np.abs(np.asarray(other) - np.asarray(direct)).max() > 1e-3
