"""Latent model folders' weights: bfloat16 folders are the model with its weights rounded,
earlier msgpack folders still load, and convert and a job's startup hold one copy."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax import convert
from sdedit_jax.latent import model as latent_model
from sdedit_jax.util import safetensors_files, weights

pytest.importorskip("torch", reason="the reference pipelines are saved by diffusers")
pytest.importorskip("diffusers", reason="the reference pipelines are saved by diffusers")
pytest.importorskip("transformers", reason="the reference text encoders need transformers")

from tests import sd_reference  # noqa: E402

PROMPTS = ["a red barn in the snow", ""]


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl_base"))
    sd_reference.save_xl_pipeline(path)
    return path


def _parts(model):
    parts = {"unet": model.unet, "vae": model.vae}
    parts.update({name: tower.part for name, tower in model.towers.items()})
    return parts


def _unet_output(net, model):
    z = np.random.default_rng(5).standard_normal((2, 16, 16, 4)).astype(np.float32)
    h, pooled = model.encode_text(model.tokenize(PROMPTS))
    added = {"text_embeds": np.asarray(pooled), "time_ids": model.time_ids([(32, 32)] * 2)}
    return np.asarray(net(z, 500.0, np.asarray(h), added_cond=added))


def _with(folder, state):
    """``folder``'s U-Net with other weights."""
    net = sj.load_network(folder)
    return type(net)(net.architecture, net.config, net.graphdef, state)


def _weight_bytes(folder):
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    return sum(os.path.getsize(os.path.join(folder, n)) for n in names)


def test_a_bf16_folder_is_the_model_with_its_weights_rounded(xl_folder, tmp_path):
    full, half = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    convert.convert(xl_folder, full)
    convert.convert(xl_folder, half, with_bf16=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        tensors = safetensors_files.lazy_tensors(os.path.join(half, f"{name}.safetensors"))
        assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}, name
    loaded = sj.load_model(half)
    assert {leaf.dtype for p in _parts(loaded).values() for leaf in jax.tree.leaves(p.state)} == {
        np.dtype(ml_dtypes.bfloat16)
    }
    # The files: the float32 folder's weights rounded to bfloat16 by numpy, byte for byte.
    reference = sj.load_model(full)
    rounded = {
        name: latent_model.Part(
            part.config,
            jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), part.state),
        )
        for name, part in _parts(reference).items()
    }
    os.makedirs(tmp_path / "rounded")
    assert latent_model.save_weights(str(tmp_path / "rounded"), rounded) == _sums(half)
    # The compute: bfloat16 weights are widened, not computed in (float32 is the default).
    widened = jax.tree.map(lambda a: np.asarray(a, np.float32), rounded["unet"].state)
    np.testing.assert_array_equal(
        _unet_output(sj.load_network(half), loaded), _unet_output(_with(full, widened), loaded)
    )
    ids = loaded.tokenize(PROMPTS)
    for a, b in zip(reference.encode_text(ids), loaded.encode_text(ids), strict=True):
        assert sd_reference.rel_err(b, a) < 2e-2  # rounded weights: close, not equal
    assert 0.49 < _weight_bytes(half) / _weight_bytes(full) < 0.51


def _sums(folder):
    with open(os.path.join(folder, "model_info.json"), encoding="utf-8") as f:
        return json.load(f)["sha256"]


def test_an_earlier_msgpack_folder_loads_to_the_same_model(tmp_path):
    pipe = str(tmp_path / "pipe")
    sd_reference.save_pipeline(pipe, "sd1")
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    convert.convert(pipe, new)
    convert.convert(pipe, old)
    model = sj.load_model(new)
    info_path = os.path.join(old, "model_info.json")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    info["sha256"] = {}
    for name in latent_model.NETWORKS:  # as folders were written before the safetensors files
        os.remove(os.path.join(old, f"{name}.safetensors"))
        file = latent_model.MSGPACK_WEIGHT_FILES[name]
        info["sha256"][file] = weights.save_params_fp32(
            os.path.join(old, file), getattr(model, name).state
        )
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f)
    earlier = sj.load_model(old)
    assert earlier.description == model.description and earlier.checksum == model.checksum
    ids = model.tokenize(PROMPTS)
    np.testing.assert_array_equal(earlier.encode_text(ids), model.encode_text(ids))
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    h = np.asarray(model.encode_text(ids))
    np.testing.assert_array_equal(
        sj.load_network(old)(z, 300.0, h), sj.load_network(new)(z, 300.0, h)
    )


def test_a_converted_folder_is_read_into_the_sharding_it_is_given(xl_folder, tmp_path):
    out = str(tmp_path / "bf16")
    convert.convert(xl_folder, out, with_bf16=True)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed, plain = sj.load_model(out, sharding=replicated), sj.load_model(out)
    for a, b in zip(_parts(placed).values(), _parts(plain).values(), strict=True):
        for leaf, reference in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
            assert leaf.sharding == replicated and len(leaf.devices()) == len(jax.devices())
            np.testing.assert_array_equal(leaf, reference)


def _peak(*flags):
    command = [sys.executable, "-m", "sdedit_jax.tools.peak_memory", *flags]
    # One device: simulated CPU devices would each hold a replica in host memory.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_convert_and_a_jobs_startup_hold_one_copy_of_the_model(tmp_path):
    """Peak host memory above the process's after its imports, per byte of the model folder
    (a U-Net of 100M parameters: big enough that the weights dominate)."""
    pipe, out = str(tmp_path / "pipe"), str(tmp_path / "bf16")
    sd_reference.save_xl_pipeline(pipe, block_out_channels=(256, 512), attention_head_dim=(4, 8))
    converted = _peak("--what=convert", f"--source={pipe}", f"--out={out}", "--bf16")
    started = _peak("--what=startup", f"--model_dir={out}")
    assert converted["folder_bytes"] == started["folder_bytes"] > 150e6
    assert converted["ratio"] <= 1.3, converted
    assert started["ratio"] <= 1.3, started
