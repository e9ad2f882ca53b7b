"""The PyTorch port of the U-Net and sampler computes what the flax/JAX code computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdedit_jax import pretrained
from sdedit_jax import rng as rng_lib
from sdedit_jax import score as score_lib
from sdedit_jax.models import unet
from sdedit_jax.sampling import predictors
from sdedit_jax.sde import VPSDE
from sdedit_jax.util.config import load_config

torch = pytest.importorskip("torch")
torch_baseline = pytest.importorskip("sdedit_jax.tools.torch_baseline")

TINY = unet.UNetConfig(
    image_size=16, num_channels=3, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)
)
SDE = VPSDE()


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def _perturbed_model(time_embedding):
    """A tiny model with all parameters perturbed: the zero-initialised output
    layers would otherwise make the output ~0 and the comparison vacuous."""
    model = unet.build(dataclasses.replace(TINY, time_embedding=time_embedding), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [p + 0.1 * _normal(i, p.shape) for i, p in enumerate(leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


@pytest.fixture(scope="module")
def flax_models():
    return {embedding: _perturbed_model(embedding) for embedding in unet.TIME_EMBEDDINGS}


@pytest.fixture(scope="module")
def flax_model(flax_models):
    """The default (DDPM++) embedding: the sampler does not depend on the embedding."""
    return flax_models["sinusoidal"]


@pytest.mark.parametrize("config_path", ["configs/train_emoji.py", None])
def test_param_count_matches_flax(config_path):
    if config_path is None:
        config = dataclasses.replace(TINY, time_embedding="fourier")
    else:
        config = unet.UNetConfig.from_config(load_config(config_path).model)
    abstract = nnx.eval_shape(lambda: unet.UNet(config, rngs=nnx.Rngs(0)))
    assert torch_baseline.count_params(torch_baseline.TorchUNet(config)) == unet.count_params(
        abstract
    )


@pytest.mark.parametrize("memory_format", ["contiguous_format", "channels_last"])
@pytest.mark.parametrize("time_embedding", unet.TIME_EMBEDDINGS)
def test_network_output_matches_flax(flax_models, time_embedding, memory_format):
    flax_model = flax_models[time_embedding]
    x = _normal(10, (3, 16, 16, 3))
    cond = np.array([0.01, 0.3, 0.9], np.float32)
    expected = np.asarray(nnx.jit(lambda m, x, c: m(x, c, train=False))(flax_model, x, cond))
    fmt = getattr(torch, memory_format)
    net = torch_baseline.from_flax(flax_model).to(memory_format=fmt)
    with torch.no_grad():
        out = net(_nchw(x).contiguous(memory_format=fmt), torch.from_numpy(cond))
    scale = np.abs(expected).max()
    assert scale > 0.1  # a non-trivial output, so the tolerance below means something
    np.testing.assert_allclose(_nhwc(out), expected, rtol=0, atol=2e-5 * scale)


def test_schedule_matches_closed_form_vp():
    t0, n = np.array([0.5, 0.8], np.float32), 4
    schedule = torch_baseline.edit_schedule(SDE, "sinusoidal", t0, n)
    t = t0[None, :] + (SDE.eps - t0[None, :]) * np.arange(n)[:, None] / n
    beta = SDE.beta_min + t * (SDE.beta_max - SDE.beta_min)
    integral = SDE.beta_min * t + 0.5 * (SDE.beta_max - SDE.beta_min) * t**2
    np.testing.assert_allclose(schedule.cond.numpy(), t, rtol=1e-6)
    np.testing.assert_allclose(
        schedule.dt.numpy(), np.broadcast_to((t0 - SDE.eps) / n, (n, 2)), rtol=1e-5
    )
    np.testing.assert_allclose(schedule.g2.numpy(), beta, rtol=1e-5)
    np.testing.assert_allclose(schedule.drift_coeff.numpy(), -0.5 * beta, rtol=1e-5)
    np.testing.assert_allclose(
        schedule.inv_std.numpy(), 1 / np.sqrt(1 - np.exp(-integral)), rtol=1e-5
    )
    np.testing.assert_allclose(schedule.mean0.numpy(), np.exp(-0.5 * integral[0]), rtol=1e-6)


def test_sampler_step_and_one_step_edit_match_jax(flax_model):
    """One Euler-Maruyama step on the same state and noise; and ``reverse`` with
    a single step, whose denoised output is that step's noise-free mean."""
    graphdef, state = nnx.split(flax_model)
    score_fn = score_lib.make_score_fn(graphdef, state, SDE, "noise", "t")
    x = _normal(20, (2, 16, 16, 3))
    t0 = np.array([0.3, 0.7], np.float32)
    keys = rng_lib.example_keys(np.arange(2, dtype=np.int32), np.zeros((2, 1), np.uint32))

    @jax.jit
    def jax_step(score_fn, keys, x):
        t = jnp.asarray(t0)
        step = predictors.euler_maruyama(SDE, score_fn, keys, x, t, t - SDE.eps)
        return *step, rng_lib.example_noise(keys, x)

    x_next, x_mean, noise = (np.asarray(a) for a in jax_step(score_fn, keys, x))
    net = torch_baseline.from_flax(flax_model)
    schedule = torch_baseline.edit_schedule(SDE, "sinusoidal", t0, 1)
    with torch.no_grad():
        torch_next, torch_mean = torch_baseline.euler_maruyama_step(
            net, "noise", schedule, 0, _nchw(x), _nchw(noise)
        )
        denoised = torch_baseline.reverse(net, "noise", schedule, _nchw(x))
    # The step moves x by O(1): compare against the size of the update.
    scale = np.abs(x_mean - x).max()
    assert scale > 0.1
    np.testing.assert_allclose(_nhwc(torch_mean), x_mean, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(_nhwc(torch_next), x_next, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(_nhwc(denoised), x_mean, rtol=0, atol=2e-5 * scale)


def test_sdedit_keeps_shape_format_and_is_seeded(flax_model):
    net = torch_baseline.from_flax(flax_model).to(memory_format=torch.channels_last)
    guides = _nchw(_normal(30, (2, 16, 16, 3))).contiguous(memory_format=torch.channels_last)
    schedule = torch_baseline.edit_schedule(SDE, "sinusoidal", np.full(2, 0.4, np.float32), 3)

    def edit(seed):
        return torch_baseline.sdedit(
            net, "noise", schedule, guides, torch.Generator().manual_seed(seed)
        )

    out = edit(0)
    assert out.shape == guides.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(edit(0), out, rtol=0, atol=0)
    assert not torch.equal(edit(1), out)


def test_load_rejects_other_architecture(flax_model):
    other = torch_baseline.TorchUNet(dataclasses.replace(flax_model.cfg, nf=12))
    with pytest.raises(ValueError, match=r"conv_in\.bias: flax shape"):
        torch_baseline.load_flax_state(other, nnx.state(flax_model))
    no_attention = torch_baseline.TorchUNet(
        dataclasses.replace(flax_model.cfg, attn_resolutions=())
    )
    with pytest.raises(ValueError, match="down/3/norm/bias has no torch counterpart"):
        torch_baseline.load_flax_state(no_attention, nnx.state(flax_model))


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="n_steps"):
        torch_baseline.edit_schedule(SDE, "sinusoidal", np.array([0.5], np.float32), 0)


def test_edit_baseline_edits_with_the_loaded_models_own_settings(flax_models):
    """The benchmarks' builder uses the model's network, time embedding and
    parameterization: each memory format gives what the port, called directly, gives."""
    flax_model = flax_models["fourier"]
    graphdef, state = nnx.split(flax_model)
    model = pretrained.LoadedModel(
        score_fn=score_lib.make_score_fn(graphdef, state, SDE, "scaled", "sigma"),
        sde=SDE,
        image_size=16,
        num_channels=3,
        checksum="",
        path="tiny",
        graphdef=graphdef,
        state=state,
        parameterization="scaled",
    )
    guides, t0 = _normal(40, (2, 16, 16, 3)), np.array([0.3, 0.6], np.float32)
    baseline = torch_baseline.EditBaseline(model, guides, t0)
    schedule = torch_baseline.edit_schedule(SDE, "fourier", t0, 3)
    for name, fmt in torch_baseline.MEMORY_FORMATS.items():
        net = torch_baseline.from_flax(flax_model).to(memory_format=fmt)
        expected = torch_baseline.sdedit(
            net,
            "scaled",
            schedule,
            _nchw(guides).contiguous(memory_format=fmt),
            torch.Generator().manual_seed(5),
        )
        out = baseline.edit(name, 3, seed=5)
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, expected)
    np.testing.assert_array_equal(_nhwc(baseline.guides), guides)
