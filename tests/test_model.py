"""Tests of the score network, its fast convolution and the score parameterisations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdedit_jax import score as score_lib
from sdedit_jax.models import layers, unet
from sdedit_jax.sde import VESDE, VPSDE
from sdedit_jax.training import losses

TINY = unet.UNetConfig(
    image_size=8,
    num_channels=3,
    nf=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    dropout=0.1,
)


def _normal(seed, shape):
    """Test data from numpy: eager jax.random compiles a program per shape."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@nnx.jit
def _forward(model, x, cond):
    """Eval-mode forward; jitted because op-by-op dispatch of a U-Net takes seconds."""
    return model(x, cond, train=False)


def _grads(conv, x, w, cotangent):
    """Input and weight gradients of <conv(x, w), cotangent>."""
    return jax.grad(lambda x, w: jnp.sum(conv(x, w) * cotangent), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("kernel_size,c_in,c_out", [(3, 5, 7), (1, 6, 4), (5, 3, 2)])
def test_fast_conv_matches_lax_in_value_and_gradients(kernel_size, c_in, c_out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, c_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, c_in, c_out)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 6, 5, c_out)), jnp.float32)
    np.testing.assert_array_equal(layers.conv2d(x, w), layers.lax_conv2d(x, w))
    fast_dx, fast_dw = _grads(layers.conv2d, x, w, cotangent)
    ref_dx, ref_dw = _grads(layers.lax_conv2d, x, w, cotangent)
    np.testing.assert_allclose(fast_dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast_dw, ref_dw, rtol=1e-5, atol=1e-4)


def test_conv_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd kernel"):
        layers.lax_conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((2, 2, 1, 1)))


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny model per time embedding, built once for the whole session."""
    models = {}
    for embedding in unet.TIME_EMBEDDINGS:
        model = unet.build(dataclasses.replace(TINY, time_embedding=embedding), seed=0)
        models[embedding] = model
    return models


@pytest.mark.parametrize("embedding", unet.TIME_EMBEDDINGS)
@pytest.mark.slow
def test_model_output_shape_and_time_dependence(tiny_models, embedding):
    model = tiny_models[embedding]
    x = _normal(1, (3, 8, 8, 3))
    cond = jnp.array([0.01, 0.3, 0.9])
    # Zero-initialised output layers make the raw output ~0; perturb all params so
    # the output depends on the input and the time through every block.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda p: p + 0.1 * _normal(2, p.shape), params)
    perturbed = nnx.merge(graphdef, params, rest)
    out = _forward(perturbed, x, cond)
    assert out.shape == x.shape
    assert np.all(np.isfinite(out))
    other_time = _forward(perturbed, x, cond[::-1])
    assert not np.allclose(out[0], other_time[0])


@pytest.mark.slow
def test_fast_and_lax_conv_models_have_equal_gradients(tiny_models):
    x = _normal(3, (2, 8, 8, 3))
    t = jnp.array([0.2, 0.7])
    _, params, rest = nnx.split(tiny_models["sinusoidal"], nnx.Param, ...)
    grads = []
    for fast in (True, False):
        cfg = dataclasses.replace(TINY, fast_conv=fast)
        abstract = nnx.eval_shape(lambda cfg=cfg: unet.UNet(cfg, rngs=nnx.Rngs(0)))
        graphdef = nnx.split(abstract, nnx.Param, ...)[0]

        def loss(params, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params, rest)(x, t, train=False) ** 2)

        grads.append(jax.jit(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_needs_a_key_in_training_and_is_off_in_eval(tiny_models):
    model = tiny_models["sinusoidal"]
    x, t = jnp.ones((2, 8, 8, 3)), jnp.array([0.5, 0.5])
    np.testing.assert_array_equal(_forward(model, x, t), _forward(model, x, t))
    with pytest.raises(ValueError, match="no `rngs` argument was provided to Dropout"):
        model(x, t, train=True)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="time_embedding"):
        unet.UNetConfig(time_embedding="positional")
    with pytest.raises(ValueError, match="model.n_filters: unknown field, got 8"):
        unet.UNetConfig.from_config({"nf": 8, "n_filters": 8})
    with pytest.raises(ValueError, match="image_size"):
        unet.UNetConfig(image_size=10, ch_mult=(1, 2, 2))


def test_output_to_score_follows_the_definitions():
    out, x = _normal(4, (2, 4, 4, 3)), _normal(5, (2, 4, 4, 3))
    m, std = jnp.array([0.6, 0.8]), jnp.array([0.8, 0.6])
    m_b, std_b = m[:, None, None, None], std[:, None, None, None]

    def to_score(parameterization):
        return score_lib.output_to_score(out, x, m, std, parameterization)

    np.testing.assert_array_equal(to_score("score"), out)
    np.testing.assert_allclose(to_score("noise"), -out / std_b, rtol=1e-6)
    np.testing.assert_allclose(to_score("scaled"), out / std_b, rtol=1e-6)
    # v = m z - s x0 with x = m x0 + s z, m^2 + s^2 = 1: z = m v + s x, score = -z / s.
    np.testing.assert_allclose(to_score("velocity"), -(m_b * out + std_b * x) / std_b, rtol=1e-5)
    with pytest.raises(ValueError, match="parameterization"):
        to_score("eps")


def test_velocity_needs_a_variance_preserving_sde():
    score_lib.check_parameterization("velocity", VPSDE())
    with pytest.raises(ValueError, match="variance-preserving SDE, got VESDE"):
        score_lib.check_parameterization("velocity", VESDE())


class _OracleModel(nnx.Module):
    """Exact network output for data concentrated at x0 = 0, where x_t = s(t) z and the
    true score is -x_t / s(t)^2 (independent of any learned weights)."""

    def __init__(self, sde, parameterization):
        self.sde = sde
        self.parameterization = parameterization

    def __call__(self, x, t, cond=None, *, train=False, rngs=None):
        s = self.sde.marginal_std(t)[:, None, None, None]
        m = jnp.exp(self.sde.log_mean_coeff(t))[:, None, None, None]
        outputs = {"noise": x / s, "scaled": -x / s, "score": -x / s**2, "velocity": m * x / s}
        return outputs[self.parameterization]


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("parameterization", score_lib.PARAMETERIZATIONS)
@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.slow
def test_dsm_loss_vanishes_at_the_true_score(sde, parameterization, likelihood_weighting):
    if parameterization == "velocity" and not sde.variance_preserving:
        pytest.skip("velocity is defined for variance-preserving SDEs only (tested above)")
    images = jnp.zeros((4, 4, 4, 3))
    kwargs = dict(
        parameterization=parameterization, condition="t", likelihood_weighting=likelihood_weighting
    )
    key = jax.random.key(5)
    oracle = _OracleModel(sde, parameterization)
    assert float(losses.dsm_loss(oracle, sde, images, key, **kwargs)) < 1e-9
    # The same oracle is wrong for data away from zero, and the loss must see it.
    shifted = jnp.full((4, 4, 4, 3), 0.5)
    assert float(losses.dsm_loss(oracle, sde, shifted, key, **kwargs)) > 1e-3


def test_per_example_noise_does_not_depend_on_batch_split():
    sde = VPSDE()
    images = jnp.zeros((6, 2, 2, 1))
    t_full, z_full = losses.sample_times_and_noise(jax.random.key(6), images, sde)
    assert np.all((t_full >= sde.eps) & (t_full <= sde.T))
    t_half, z_half = losses.sample_times_and_noise(jax.random.key(6), images[:3], sde)
    np.testing.assert_array_equal(t_half, t_full[:3])
    np.testing.assert_array_equal(z_half, z_full[:3])


def test_score_fn_matches_model_and_is_a_stable_static_pytree(tiny_models):
    sde = VPSDE()
    model_a = tiny_models["sinusoidal"]
    model_b = unet.build(model_a.cfg, seed=1)
    graphdef_a, state_a = nnx.split(model_a)
    graphdef_b, state_b = nnx.split(model_b)
    fn_a = score_lib.make_score_fn(graphdef_a, state_a, sde, "noise", "t")
    fn_b = score_lib.make_score_fn(graphdef_b, state_b, sde, "noise", "t")

    x = _normal(7, (2, 8, 8, 3))
    t = jnp.array([0.1, 0.8])
    expected = -_forward(model_a, x, t) / sde.marginal_std(t)[:, None, None, None]

    treedef_a = jax.tree_util.tree_structure(fn_a)
    assert treedef_a == jax.tree_util.tree_structure(fn_b)
    assert hash(treedef_a) == hash(jax.tree_util.tree_structure(fn_b))
    assert {leaf.size for leaf in jax.tree.leaves(fn_a)} == {
        leaf.size for leaf in jax.tree.leaves(state_a)
    }

    traces = []

    @jax.jit
    def apply(score_fn, x, t):
        traces.append(1)
        return score_fn(x, t)

    np.testing.assert_allclose(apply(fn_a, x, t), expected, rtol=1e-5, atol=1e-6)
    expected_b = -_forward(model_b, x, t) / sde.marginal_std(t)[:, None, None, None]
    np.testing.assert_allclose(apply(fn_b, x, t), expected_b, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1, "new weights of the same architecture must not retrace"
    fn_ve = score_lib.make_score_fn(graphdef_a, state_a, VESDE(), "noise", "t")
    assert jax.tree_util.tree_structure(fn_ve) != treedef_a
