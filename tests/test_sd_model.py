"""``sj.load_model`` of Stable Diffusion: the public contract against diffusers/transformers.

Truth: a tiny random ``StableDiffusionImg2ImgPipeline`` (SD 1.x and SD 2.x structures)
saved by diffusers itself; its tokenizer, ``encode_prompt``, VAE and U-Net. The
converted folder and the single file written from the same weights must give the same
numbers; guidance and the codec's options are checked against their definitions.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax import convert
from sdedit_jax.latent import codec as codec_lib
from sdedit_jax.latent import guidance
from sdedit_jax.latent import model as latent_model

torch = pytest.importorskip("torch", reason="the reference pipeline needs torch")
diffusers = pytest.importorskip("diffusers", reason="the reference pipeline needs diffusers")
pytest.importorskip("transformers", reason="the reference text encoder needs transformers")

from tests import sd_reference  # noqa: E402

TOL = 1e-4
TEXTS = ["a red barn", "", "An astronaut, riding a horse! " * 12, "café au lait 🐎"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipeline(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    prediction = "epsilon" if request.param == "sd1" else "v_prediction"
    pipe = sd_reference.save_pipeline(folder, request.param, prediction)
    return folder, pipe


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _reference_outputs(pipe, x, z, t):
    """Every output the contract fixes, computed by the reference pipeline."""
    tokens = pipe.tokenizer(
        TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids
    with torch.no_grad():
        h = pipe.encode_prompt(TEXTS, "cpu", 1, False)[0]
        sf = pipe.vae.config.scaling_factor
        mean = pipe.vae.encode(_nchw(x)).latent_dist.mean * sf
        decoded = pipe.vae.decode(_nchw(z) / sf).sample
        eps = pipe.unet(_nchw(z), torch.tensor(t), encoder_hidden_states=h[: len(z)]).sample
    return tokens, h.numpy(), _nhwc(mean), _nhwc(decoded), _nhwc(eps)


def _inputs(model):
    rng = np.random.default_rng(0)
    side, cells = model.image_size, model.image_size // model.size_multiple
    x = rng.uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    z = rng.normal(size=(2, cells, cells, 4)).astype(np.float32)
    return x, z, np.array([999.0, 261.5], np.float32)


def _contract(path, x, z, t, **options):
    model = sj.load_model(path, **options)
    ids = model.tokenize(TEXTS)
    h = model.encode_text(ids)
    network = sj.load_network(path, **options)
    return model, (ids, h, model.encode(x), model.decode(z), network(z, t, h[: len(z)]))


def _check(found, expected):
    ids, *arrays = found
    np.testing.assert_array_equal(ids, expected[0])
    for name, a, b in zip(("text", "encode", "decode", "unet"), arrays, expected[1:], strict=True):
        err = sd_reference.rel_err(a, b)
        assert err <= TOL, (name, err)


def test_the_contract_matches_diffusers_on_its_folder_and_on_the_converted_one(pipeline, tmp_path):
    folder, pipe = pipeline
    model, found = _contract(folder, *_inputs(sj.load_model(folder)))
    _check(found, _reference_outputs(pipe, *_inputs(model)))
    assert model.parameterization == ("noise" if "sd1" in folder else "velocity")
    assert (model.image_size, model.size_multiple, model.latent_channels) == (32, 2, 4)

    out = str(tmp_path / "converted")
    info = convert.convert(folder, out)
    assert info["latent"]["size_multiple"] == 2 and info["latent"]["image_size"] == 32
    converted, again = _contract(out, *_inputs(model))
    for a, b in zip(found, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert converted.description == model.description
    assert converted.checksum == model.checksum


def test_fp16_and_bin_variants_load_to_the_same_model(tmp_path):
    """``fp16`` files widen to float32 (equal to the half weights); ``.bin`` equals safetensors."""
    half, bins = str(tmp_path / "fp16"), str(tmp_path / "bin")
    sd_reference.save_pipeline(half, "sd1", variant="fp16")
    sd_reference.save_pipeline(bins, "sd1", safe_serialization=False)
    assert os.path.exists(os.path.join(bins, "unet", "diffusion_pytorch_model.bin"))
    full = sj.load_model(bins)
    low = sj.load_model(half, variant="fp16")
    state = jax.tree.leaves(full.unet.state)
    np.testing.assert_array_equal(
        jax.tree.leaves(low.unet.state)[0], state[0].astype(jnp.float16).astype(jnp.float32)
    )
    with pytest.raises(FileNotFoundError, match="none of the weight files"):
        sj.load_model(half)


def test_a_single_file_loads_to_the_same_numbers(pipeline, tmp_path):
    import safetensors.numpy

    from tests.test_sd_single_file import (
        original_open_clip,
        original_text,
        original_unet,
        original_vae,
    )

    folder, pipe = pipeline
    numpy = {
        name: {k: v.detach().numpy() for k, v in getattr(pipe, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    unet_config = dict(sd_reference.PIPELINES["sd1" if "sd1" in folder else "sd2"][0])
    text = (
        original_text(numpy["text_encoder"])
        if "sd1" in folder
        else original_open_clip(
            numpy["text_encoder"], sd_reference.TEXT["num_hidden_layers"], np.random.default_rng(5)
        )
    )
    path = str(tmp_path / "model.safetensors")
    tensors = {
        **original_unet(numpy["unet"], unet_config),
        **original_vae(numpy["vae"], 2, sd_reference.VAE["layers_per_block"]),
        **text,
    }
    safetensors.numpy.save_file(tensors, path)
    model = sj.load_model(folder)
    expected = _contract(folder, *_inputs(model))[1]
    single, found = _contract(path, *_inputs(model), config_folder=folder)
    for a, b in zip(found, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    assert single.parameterization == model.parameterization
    with pytest.raises(ValueError, match="carries no tokenizer"):
        latent_model.from_single_file(path, None)


def test_guidance_is_one_call_exact_at_w_le_1_and_drops_the_negative_half(pipeline):
    folder, _ = pipeline
    model = sj.load_model(folder)
    _, z, _ = _inputs(model)
    h = model.encode_text(model.tokenize(["a red barn", "a blue house"]))
    hn = model.encode_text(model.tokenize(["", ""]))
    t = jnp.asarray([0.7, 0.3])
    cond_only = guidance.text_condition(h, hn, [1.0, 0.5])
    assert "negative" not in cond_only
    guided = guidance.text_condition(h, hn, [7.5, 1.0])
    call = jax.jit(lambda score, *args: score(*args))
    conditional = model.score_fn.conditional
    s_c = call(conditional, z, t, {"text": h})
    s_u = call(conditional, z, t, {"text": hn})
    found = call(model.score_fn, z, t, guided)
    np.testing.assert_allclose(found[0], s_u[0] + 7.5 * (s_c[0] - s_u[0]), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(call(model.score_fn, z, t, cond_only), s_c)
    np.testing.assert_allclose(found[1], s_c[1], rtol=1e-5, atol=1e-5)
    for bad in ([np.nan, 1.0], [-1.0, 2.0]):
        with pytest.raises(ValueError, match="guidance"):
            guidance.text_condition(h, hn, bad)


def test_codec_options_follow_their_definitions(pipeline):
    folder, _ = pipeline
    model = sj.load_model(folder)
    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[0, 5, 9] = 1.0  # one thin stroke pixel: odd row and column of its 2x2 cell
    mask[0, 20:24, 20:24] = 0.6
    pooled = np.asarray(model.codec.latent_mask(mask))[0, ..., 0]
    nearest = np.asarray(model.codec_with(mask_downsample="nearest").latent_mask(mask))[0, ..., 0]
    assert pooled[2, 4] == 1.0 and nearest[2, 4] == 0.0  # the stroke survives max-pooling only
    np.testing.assert_array_equal(pooled[10:12, 10:12], np.float32(0.6))
    np.testing.assert_array_equal(nearest[10:12, 10:12], 1.0)  # >= 0.5 binarises to editable
    x, _, _ = _inputs(model)
    sample = model.codec_with(posterior="sample")
    keys = jax.random.split(jax.random.key(3), 2)
    z1, z2 = (np.asarray(jax.jit(sample.encode)(keys, x)) for _ in range(2))
    np.testing.assert_array_equal(z1, z2)
    other = np.asarray(jax.jit(sample.encode)(jax.random.split(jax.random.key(4), 2), x))
    mean = np.asarray(model.encode(x))
    assert np.abs(z1 - mean).max() > 1e-4 and np.abs(z1 - other).max() > 1e-4
    with pytest.raises(ValueError, match="posterior: must be one of"):
        model.codec_with(posterior="mode")
    with pytest.raises(ValueError, match="mask_downsample: must be one of"):
        codec_lib.check_options("mean", "bilinear")


def test_bad_folders_are_named_in_one_line(pipeline, tmp_path):
    folder, _ = pipeline
    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    shutil.rmtree(os.path.join(broken, "unet"))
    with pytest.raises(
        FileNotFoundError, match=r"broken/unet: missing \(model_index.json names it\)"
    ):
        sj.load_model(broken)
    shutil.copytree(os.path.join(folder, "unet"), os.path.join(broken, "unet"))
    os.remove(os.path.join(broken, "tokenizer", "tokenizer.json"))  # what transformers 5 saves
    with pytest.raises(FileNotFoundError, match=r"tokenizer: no vocab.json \+ merges.txt nor"):
        sj.load_model(broken)
    shutil.copy(
        os.path.join(folder, "tokenizer", "tokenizer.json"), os.path.join(broken, "tokenizer")
    )
    with open(os.path.join(broken, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    with open(os.path.join(broken, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**sched, "prediction_type": "sample"}, f)
    with pytest.raises(ValueError, match="prediction_type: 'sample' is not one of"):
        sj.load_model(broken)
