"""The sharded edit program: invariances, compile-once behaviour and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax import engine
from sdedit_jax.tools.gaussian_reference import GaussianScore

SDE = sj.VPSDE()


def _conv_score(params, x, t):
    """A small random conv net: exercises weights as traced pytree leaves."""
    h = jax.lax.conv_general_dilated(
        x, params["w1"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h + t.reshape(-1, 1, 1, 1) * params["b"].reshape(1, 1, 1, -1))
    return jax.lax.conv_general_dilated(
        h, params["w2"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_score_fn(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w1": 0.3 * jax.random.normal(k1, (3, 3, 3, 8)),
        "w2": 0.3 * jax.random.normal(k2, (3, 3, 8, 3)),
        "b": jax.random.normal(k3, (8,)),
    }
    return jax.tree_util.Partial(_conv_score, params)


SCORES = {"gaussian": GaussianScore(SDE, 0.1, 0.5), "convnet": _conv_score_fn()}


def _inputs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    guides = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
    t0 = rng.uniform(0.2, 0.9, n).astype(np.float32)
    mask = (rng.random((n, 8, 8, 1)) < 0.6).astype(np.float32)
    ids = np.arange(1000, 1000 + n)
    return guides, t0, mask, ids


SAMPLER_KWARGS = {
    "reverse_diffusion+langevin": dict(predictor="reverse_diffusion", corrector="langevin"),
    "ddim_eta0.5": dict(predictor="ddim", eta=0.5),
    "dpm_solver_2m": dict(predictor="dpm_solver_2m"),
    "sde_dpm_solver_2m_karras": dict(predictor="sde_dpm_solver_2m", time_grid="karras"),
}


@pytest.mark.parametrize("sampler_name", SAMPLER_KWARGS)
@pytest.mark.parametrize("score_name", SCORES)
@pytest.mark.slow
def test_output_independent_of_batch_size_position_and_devices(score_name, sampler_name):
    score = SCORES[score_name]
    guides, t0, mask, ids = _inputs()
    kw = dict(seed=5, n_steps=12, **SAMPLER_KWARGS[sampler_name])
    full = np.asarray(sj.sdedit(score, SDE, guides, example_ids=ids, t0=t0, mask=mask, **kw))
    single = np.asarray(
        sj.sdedit(score, SDE, guides[3:4], example_ids=ids[3:4], t0=t0[3:4], mask=mask[3:4], **kw)
    )
    np.testing.assert_array_equal(single[0], full[3])
    order = np.random.default_rng(1).permutation(64)[:7]
    seven = np.asarray(
        sj.sdedit(
            score, SDE, guides[order], example_ids=ids[order], t0=t0[order], mask=mask[order], **kw
        )
    )
    np.testing.assert_array_equal(seven, full[order])
    one_device = engine.data_mesh(jax.devices()[:1])
    alone = np.asarray(
        sj.sdedit(score, SDE, guides, example_ids=ids, t0=t0, mask=mask, mesh=one_device, **kw)
    )
    np.testing.assert_array_equal(alone, full)
    assert len(jax.devices()) == 8


def test_seed_and_id_change_the_noise():
    guides, t0, _, ids = _inputs(8)
    score = SCORES["gaussian"]
    a = np.asarray(sj.sdedit(score, SDE, guides, example_ids=ids, t0=t0, n_steps=4))
    b = np.asarray(sj.sdedit(score, SDE, guides, example_ids=ids + 1, t0=t0, n_steps=4))
    c = np.asarray(sj.sdedit(score, SDE, guides, seed=1, example_ids=ids, t0=t0, n_steps=4))
    assert not np.allclose(a, b) and not np.allclose(a, c)


@pytest.mark.slow
def test_changing_t0_steps_mask_or_weights_does_not_recompile():
    traces = []

    def counting_score(params, x, t):
        traces.append(x.shape)
        return _conv_score(params, x, t)

    guides, t0, mask, ids = _inputs(16)
    kw = dict(example_ids=ids, max_steps=8, predictor="ode_heun")
    first = _conv_score_fn(0)
    score = jax.tree_util.Partial(counting_score, first.args[0])
    sj.sdedit(score, SDE, guides, t0=t0, n_steps=7, mask=mask, **kw)
    compiled, traced = engine.compiled_program_count(), len(traces)
    for seed in range(3):
        new_t0 = np.random.default_rng(seed).uniform(0.1, 1.0, 16).astype(np.float32)
        new_mask = 1.0 - mask if seed % 2 else mask
        weights = _conv_score_fn(seed + 1).args[0]
        score = jax.tree_util.Partial(counting_score, weights)
        steps = engine.paper_steps(8, new_t0)
        sj.sdedit(score, SDE, guides, t0=new_t0, n_steps=steps, mask=new_mask, **kw)
        sj.sdedit(score, SDE, guides, t0=float(new_t0[0]), n_steps=seed + 5, mask=new_mask, **kw)
    assert engine.compiled_program_count() == compiled
    assert len(traces) == traced
    # A new bucket is a new program (static by design).
    sj.sdedit(score, SDE, guides, t0=t0, n_steps=9, mask=mask, **{**kw, "max_steps": 16})
    assert engine.compiled_program_count() == compiled + 1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mask=np.ones((4, 8, 7, 1), np.float32)), "mask: shape"),
        (dict(mask=np.full((4, 8, 8, 1), 2.0, np.float32)), "mask: values"),
        (dict(t0=0.0), r"t0: every value must lie in"),
        (dict(t0=1.5), r"t0: every value must lie in"),
        (dict(t0=np.array([0.5, 0.5], np.float32)), r"t0: expected"),
        (dict(n_steps=np.array([3, 3], np.int32)), r"n_steps: expected"),
        (dict(n_steps=9, max_steps=8), r"n_steps: every value must lie in \[1, max_steps=8\]"),
        (dict(predictor="heun"), "predictor: unknown name"),
        (dict(corrector="mala"), "corrector: unknown name"),
        (dict(example_ids=np.arange(3)), "example_ids: 3 ids for 4 guides"),
        (dict(n_steps=0), "n_steps"),
        (dict(guides=np.zeros((8, 8, 3), np.float32)), r"guides: expected \[B, H, W, C\]"),
        (dict(repeats=0), "repeats"),
        (dict(repeats=np.array([1, 2, 0, 1])), r"repeats: must lie in \[1, max_repeats = 2\]"),
        (dict(repeats=3, max_repeats=2), r"repeats: must lie in \[1, max_repeats = 2\]"),
        (dict(repeats=np.array([1.0, 2.0, 1.0, 1.0])), "repeats: expected integers"),
        (dict(repeats=np.array([1, 2])), r"repeats: expected a scalar or shape \(4,\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    kw = {"guides": np.zeros((4, 8, 8, 3), np.float32), "t0": 0.5, "n_steps": 3, **change}
    with pytest.raises(ValueError, match=message):
        sj.sdedit(SCORES["gaussian"], SDE, **kw)


def test_non_finite_guides_are_named():
    guides = np.zeros((4, 8, 8, 3), np.float32)
    guides[2, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"guides: non-finite values .* \[2\]"):
        sj.sdedit(SCORES["gaussian"], SDE, guides, t0=0.5, n_steps=3)


@pytest.mark.parametrize(
    "sampler_kwargs",
    [
        dict(corrector="langevin"),
        dict(predictor="sde_dpm_solver_2m"),
    ],
    ids=["em+langevin", "sde_dpm_solver_2m"],
)
@pytest.mark.slow
def test_mixed_step_counts_equal_separate_runs(sampler_kwargs):
    """Per-example step counts: extra loop iterations leave finished examples (and a
    multistep solver's history) untouched."""
    guides, t0, mask, ids = _inputs(16)
    steps = np.where(np.arange(16) % 2 == 0, 3, 7).astype(np.int32)
    kw = dict(example_ids=ids, t0=t0, mask=mask, max_steps=8, **sampler_kwargs)
    mixed = np.asarray(sj.sdedit(SCORES["convnet"], SDE, guides, n_steps=steps, **kw))
    for n in (3, 7):
        alone = np.asarray(sj.sdedit(SCORES["convnet"], SDE, guides, n_steps=n, **kw))
        np.testing.assert_array_equal(mixed[steps == n], alone[steps == n])
    assert not np.allclose(
        mixed[steps == 3],
        np.asarray(sj.sdedit(SCORES["convnet"], SDE, guides, n_steps=7, **kw))[steps == 3],
    )


def test_mixed_repeats_are_one_program_and_equal_separate_runs():
    """Per-example K = 1, 2, 3 in one bucket: one compiled program (a new mix reuses it), and
    each row bit-identical to a run of its K alone (static K, the program before buckets);
    masked, with a multistep solver."""
    guides, t0, mask, ids = _inputs(16)
    kw = dict(example_ids=ids, t0=t0, mask=mask, n_steps=4, predictor="sde_dpm_solver_2m")
    k = (np.arange(16) % 3 + 1).astype(np.int32)
    mixed = np.asarray(sj.sdedit(SCORES["convnet"], SDE, guides, repeats=k, **kw))
    compiled = engine.compiled_program_count()
    other = np.asarray(sj.sdedit(SCORES["convnet"], SDE, guides, repeats=np.roll(k, 1), **kw))
    assert engine.compiled_program_count() == compiled
    for n in (1, 2, 3):
        alone = np.asarray(sj.sdedit(SCORES["convnet"], SDE, guides, repeats=n, **kw))
        np.testing.assert_array_equal(mixed[k == n], alone[k == n])
        np.testing.assert_array_equal(other[np.roll(k, 1) == n], alone[np.roll(k, 1) == n])
    assert not np.allclose(mixed[k == 1], other[k == 1])  # K changes the output
