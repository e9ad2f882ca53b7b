"""Tests of training: learning, checkpoints, exact resume, data parallelism, weight files."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sdedit_jax import engine
from sdedit_jax.models import unet
from sdedit_jax.sde import sde_from_config
from sdedit_jax.training import checkpoint, loop, losses, train_data
from sdedit_jax.util import files, weights

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load_config(name, variant=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="session")
def tiny_config():
    config = _load_config("train_tiny")
    config.training.update({"num_steps": 6, "log_every": 3, "ckpt_every_steps": 3})
    return config


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="session")
def runs(tiny_config, tmp_path_factory):
    """Three 6-step runs of the tiny config: uninterrupted on 8 devices, interrupted at
    step 3 and resumed on 8 devices, and uninterrupted on 1 device."""
    assert len(jax.devices()) == 8, "tests/conftest.py should simulate 8 CPU devices"
    dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("full", "resumed", "single")}
    states = {"full": loop.train(tiny_config, dirs["full"])}
    loop.train(tiny_config, dirs["resumed"], stop_at=3)
    states["resumed"] = loop.train(tiny_config, dirs["resumed"])
    states["single"] = loop.train(tiny_config, dirs["single"], devices=jax.devices()[:1])
    return dirs, states


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_bit_for_bit(runs):
    dirs, states = runs
    assert int(states["full"].step) == int(states["resumed"].step) == 6
    _assert_trees_equal(states["full"], states["resumed"])
    full, resumed = _read_metrics(dirs["full"]), _read_metrics(dirs["resumed"])
    assert full[6]["loss"] == resumed[6]["loss"]
    assert sorted(os.listdir(os.path.join(dirs["resumed"], "checkpoints"))) == ["3", "6"]


def test_eight_devices_match_one_device(runs):
    _, states = runs
    # Only the order of the gradient all-reduce differs, so params agree to float32
    # rounding amplified by a few Adam steps.
    for a, b in zip(
        jax.tree.leaves(states["full"].params),
        jax.tree.leaves(states["single"].params),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_final_weight_files_round_trip(runs, tiny_config):
    dirs, states = runs
    workdir = dirs["full"]
    with open(os.path.join(workdir, "model_info.json")) as f:
        info = json.load(f)
    expected = jax.device_get(loop.full_ema_state(states["full"]))
    abstract = nnx.split(nnx.eval_shape(lambda: unet.build(tiny_config.model, 0)))[1]
    fp32_path = os.path.join(workdir, "ema_params_fp32.msgpack")
    bf16_path = os.path.join(workdir, "ema_params_bf16.msgpack")
    fp32 = weights.load_params(
        fp32_path, abstract, sha256=info["sha256"]["ema_params_fp32.msgpack"]
    )
    _assert_trees_equal(fp32, expected)
    bf16 = weights.load_params(bf16_path, abstract)
    assert files.sha256(bf16_path) == info["sha256"]["ema_params_bf16.msgpack"]
    for a, b in zip(jax.tree.leaves(bf16), jax.tree.leaves(expected), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=2.0**-8, atol=1e-30)
    with pytest.raises(ValueError, match="sha256"):
        weights.load_params(fp32_path, abstract, sha256="0" * 64)
    wrong = nnx.split(
        nnx.eval_shape(lambda: unet.build(tiny_config.model.to_dict() | {"nf": 12}, 0))
    )[1]
    with pytest.raises(ValueError, match="ema_params_fp32.msgpack.*shape"):
        weights.load_params(fp32_path, wrong)


@pytest.fixture(scope="session")
def single_device_step(tiny_config):
    """A jitted train step of the tiny model on one device, and its initial state."""
    tx = loop.make_optimizer(tiny_config.optim)
    graphdef, state = loop.init_state(tiny_config, tx)
    # The same program as the 1-device run of `runs`, so the compilation cache serves it.
    sharded = loop.shard_train_step(
        loop.make_train_step(
            graphdef, sde_from_config(tiny_config.sde), tx, loop.step_config(tiny_config)
        ),
        engine.data_mesh(jax.devices()[:1]),
    )

    def step(state, images, key):
        # The jitted step donates its state; copying keeps the caller's state usable.
        return sharded(jax.tree.map(np.array, state), images, key)

    return graphdef, state, step


def test_checkpoint_restore_gives_identical_next_step(single_device_step, tmp_path):
    _, state, step = single_device_step
    images = jnp.asarray(train_data.load_train_images(_load_config("train_tiny").data, 0)[:16])
    state, _ = step(state, images, jax.random.key(1))
    manager = checkpoint.make_manager(str(tmp_path))
    checkpoint.save(manager, 1, state, {"step": 1, "seed": 0})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, meta = checkpoint.restore_latest(manager, abstract)
    assert meta == {"step": 1, "seed": 0}
    _assert_trees_equal(restored, state)
    _assert_trees_equal(
        step(restored, images, jax.random.key(2)), step(state, images, jax.random.key(2))
    )
    assert (
        checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path / "empty")), abstract)
        is None
    )


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(single_device_step, tiny_config):
    graphdef, state, step = single_device_step
    images = jnp.asarray(train_data.load_train_images(tiny_config.data, 0)[:16])
    sde = sde_from_config(tiny_config.sde)

    @jax.jit
    def eval_loss(state):
        # The same 8 noise draws before and after training: a paired comparison.
        model = nnx.merge(graphdef, state.ema_params, state.constants)
        keys = jax.random.split(jax.random.key(99), 8)
        return jnp.mean(
            jax.vmap(
                lambda k: losses.dsm_loss(
                    model, sde, images, k, parameterization="noise", condition="t", train=False
                )
            )(keys)
        )

    before = float(eval_loss(state))
    for i in range(60):
        state, _ = step(state, images, jax.random.key(i))
    after = float(eval_loss(state))
    assert np.isfinite(before) and after < 0.8 * before, (before, after)


def test_batches_are_epoch_permutations():
    key = jax.random.key(0)
    num_examples, batch_size = 10, 4
    samples = np.concatenate(
        [
            np.asarray(train_data.batch_indices(key, jnp.int32(step), batch_size, num_examples))
            for step in range(5)
        ]
    )
    first_epoch, second_epoch = samples[:10], samples[10:]
    assert sorted(first_epoch) == list(range(10)) == sorted(second_epoch)
    assert not np.array_equal(first_epoch, second_epoch)


def test_flips_are_horizontal_mirrors():
    # Rows 0, 1, 2 of every image differ, so a mirror is never the image itself.
    images = jnp.arange(16 * 2 * 3 * 1, dtype=jnp.float32).reshape(16, 2, 3, 1)
    batch = train_data.make_batch(images, jax.random.key(3), jnp.int32(0), 16, random_flip=True)
    plain = train_data.make_batch(images, jax.random.key(3), jnp.int32(0), 16, random_flip=False)
    flipped = []
    for got, original in zip(np.asarray(batch), np.asarray(plain), strict=True):
        mirrored = np.array_equal(got, original[:, ::-1])
        assert mirrored or np.array_equal(got, original)
        flipped.append(mirrored)
    # A fair coin per example: with 16 draws both outcomes occur (fixed key, so no flakes).
    assert 0 < sum(flipped) < len(flipped), flipped


def test_config_errors_name_the_field(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="sde.sigma: unknown field, got 1.0"):
        sde_from_config(ml_collections.ConfigDict(tiny_config.sde.to_dict() | {"sigma": 1.0}))
    bad = tiny_config.copy_and_resolve_references()
    bad.training.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12"):
        loop.train(bad, str(tmp_path))
    bad.data.source = "cifar"
    with pytest.raises(ValueError, match="config.data.source"):
        train_data.load_train_images(bad.data, 0)


def test_emoji_config_builds_the_default_model():
    config = _load_config("train_emoji")
    model = nnx.eval_shape(lambda: unet.build(config.model, config.seed))
    assert 0.8e6 < unet.count_params(model) < 1.5e6
    assert config.training.batch_size % 8 == 0
    assert config.optim.decay_steps == config.training.num_steps


def test_shipped_model_is_what_the_continued_config_trains():
    """The shipped weights' info matches configs/train_emoji.py:continued (model, SDE, steps)."""
    config = _load_config("train_emoji", "continued")
    with open(
        os.path.join(os.path.dirname(engine.__file__), "assets", "default_model", "model_info.json")
    ) as f:
        info = json.load(f)
    assert info["step"] == config.training.num_steps
    assert info["model"] == json.loads(json.dumps(config.model.to_dict()))
    assert info["sde"] == config.sde.to_dict()
    assert info["parameterization"] == config.training.parameterization
    assert _load_config("train_emoji").training.num_steps < config.training.num_steps


@pytest.mark.slow
def test_streaming_tfdata_source_resumes_exactly(tiny_config, tmp_path):
    """Folder source through tf.data: interrupted + resumed == uninterrupted, bit for bit."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(folder / f"{i:02d}.png")
    config = tiny_config.copy_and_resolve_references()
    config.data = ml_collections.ConfigDict(
        {
            "source": "folder",
            "path": str(folder),
            "image_size": 8,
            "num_channels": 3,
            "random_flip": True,
        }
    )
    config.training.num_steps = 4
    full = loop.train(config, str(tmp_path / "full"), devices=jax.devices()[:2])
    loop.train(config, str(tmp_path / "resumed"), devices=jax.devices()[:2], stop_at=2)
    resumed = loop.train(config, str(tmp_path / "resumed"), devices=jax.devices()[:2])
    _assert_trees_equal(full, resumed)
