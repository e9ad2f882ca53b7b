"""Stable Diffusion's U-Net, VAE and CLIP text encoder against diffusers/transformers.

Tiny random components of the real architectures (SD 1.x and SD 2.x structures), saved
by the reference libraries with ``save_pretrained``, are imported from their folders and
must give the reference's outputs within 1e-4 of the output scale (RMS).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from sdedit_jax.importers import diffusers_sd, state_dict
from sdedit_jax.models import clip_text, sd_unet, vae
from tests import sd_reference

TOL = 1e-4


def _torch():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return pytest.importorskip("torch")


def _nhwc(x) -> np.ndarray:
    return np.asarray(x.detach().numpy()).transpose(0, 2, 3, 1)


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_call(graphdef: nnx.GraphDef, method: str, state: nnx.State, *args):
    net = nnx.merge(graphdef, state)
    return getattr(net, method)(*args) if method else net(*args)


def _run(module, config, state, *args, method: str = ""):
    """The network of ``config`` with ``state``, applied under one cached jit."""
    return _jit_call(module.abstract(config)[0], method, state, *args)


@pytest.mark.slow
@pytest.mark.parametrize(
    "structure, size",
    [("sd1", (16, 16)), ("sd2", (9, 12))],  # 9 x 12: the odd-size upsampling path
)
def test_unet_matches_diffusers(tmp_path, structure, size):
    """UNet2DConditionModel(z, t, encoder_hidden_states=h).sample, NHWC, per-example float t."""
    torch = _torch()
    config = {"sd1": sd_reference.UNET_SD1, "sd2": sd_reference.UNET_SD2}[structure]
    reference = sd_reference.save_unet(str(tmp_path), config)
    unet = diffusers_sd.load_unet(str(tmp_path))
    if structure == "sd2":
        assert unet.config.attention_heads == (2, 4) and unet.config.use_linear_projection
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, *size, 4), dtype=np.float32)
    t = np.array([999.0, 17.5], np.float32)
    h = rng.standard_normal((2, 7, 32), dtype=np.float32)
    with torch.no_grad():
        expected = _nhwc(reference(_nchw(z), torch.from_numpy(t), torch.from_numpy(h)).sample)
    err = sd_reference.rel_err(_run(sd_unet, unet.config, unet.state, z, t, {"text": h}), expected)
    print(f"{structure} unet: max rel err {err:.2e}")
    assert err <= TOL
    if structure == "sd2":
        # bfloat16 compute: float32 out, near the reference (bfloat16 keeps ~3 digits).
        half = dataclasses.replace(unet.config, compute_dtype="bfloat16")
        low = _run(sd_unet, half, unet.state, z, t, {"text": h})
        assert low.dtype == np.float32
        err = sd_reference.rel_err(low, expected)
        print(f"{structure} unet bfloat16: max rel err {err:.2e}")
        assert 1e-4 < err < 0.25  # measured 0.08: bfloat16 through 2 levels of a U-Net
    else:
        # A scalar t applies to the whole batch; a bare array is read as {"text": array}.
        with torch.no_grad():
            expected = _nhwc(reference(_nchw(z), 500.0, torch.from_numpy(h)).sample)
        found = _run(sd_unet, unet.config, unet.state, z, np.float32(500.0), h)
        assert sd_reference.rel_err(found, expected) <= TOL


def test_unet_refuses_missing_or_misshaped_text():
    net = nnx.merge(*sd_unet.abstract(diffusers_sd.unet_config(sd_reference.UNET_SD1)))
    z = np.zeros((2, 8, 8, 4), np.float32)
    with pytest.raises(ValueError, match=r"cond: needs"):
        net(z, 1.0)
    with pytest.raises(ValueError, match=r"cond\['text'\]: shape \(1, 5, 32\), expected \(2"):
        net(z, 1.0, {"text": np.zeros((1, 5, 32), np.float32)})


@pytest.mark.slow
def test_vae_matches_diffusers(tmp_path):
    """encode: latent_dist.mean and .logvar; decode: decode(z).sample."""
    torch = _torch()
    reference = sd_reference.save_vae(str(tmp_path))
    component = diffusers_sd.load_vae(str(tmp_path))
    assert component.config.scaling_factor == pytest.approx(0.13025)
    assert component.config.size_multiple == 2
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    z = rng.standard_normal((2, 8, 12, 4), dtype=np.float32)
    with torch.no_grad():
        posterior = reference.encode(_nchw(x)).latent_dist
        mean, logvar = _nhwc(posterior.mean), _nhwc(posterior.logvar)
        decoded = _nhwc(reference.decode(_nchw(z)).sample)
    found_mean, found_logvar = _run(vae, component.config, component.state, x, method="encode")
    found = _run(vae, component.config, component.state, z, method="decode")
    errors = {
        "mean": sd_reference.rel_err(found_mean, mean),
        "logvar": sd_reference.rel_err(found_logvar, logvar),
        "decode": sd_reference.rel_err(found, decoded),
    }
    print("vae: max rel err " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOL
    half = dataclasses.replace(component.config, compute_dtype="bfloat16")
    low = _run(vae, half, component.state, z, method="decode")
    assert low.dtype == np.float32 and 1e-4 < sd_reference.rel_err(low, decoded) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_text_encoder_matches_transformers(tmp_path, hidden_act):
    """last_hidden_state of CLIPTextModel, from transformers 5's layout and from the
    ``text_model.``-prefixed one (with ``position_ids``) of folders saved by transformers 4."""
    torch = _torch()
    pytest.importorskip("transformers")
    import safetensors.numpy

    reference = sd_reference.save_text_encoder(str(tmp_path / "new"), hidden_act)
    ids = np.random.default_rng(3).integers(0, 1000, (3, 77))
    ids[:, 0], ids[0, 9:] = 998, 999  # a start token; one padded prompt
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
    component = diffusers_sd.load_text_encoder(str(tmp_path / "new"))
    assert component.config.hidden_act == hidden_act
    err = sd_reference.rel_err(_run(clip_text, component.config, component.state, ids), expected)
    print(f"text encoder {hidden_act}: max rel err {err:.2e}")
    assert err <= TOL
    half = dataclasses.replace(component.config, compute_dtype="bfloat16")
    low = _run(clip_text, half, component.state, ids)
    assert low.dtype == np.float32 and 1e-4 < sd_reference.rel_err(low, expected) < 0.1

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_bytes((tmp_path / "new" / "config.json").read_bytes())
    tensors = safetensors.numpy.load_file(str(tmp_path / "new" / "model.safetensors"))
    tensors = {f"text_model.{k}": v for k, v in tensors.items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    safetensors.numpy.save_file(tensors, str(old / "model.safetensors"))
    again = _run(clip_text, component.config, diffusers_sd.load_text_encoder(str(old)).state, ids)
    assert sd_reference.rel_err(again, expected) <= TOL


def test_bad_state_dict_names_every_key_in_one_error():
    """A missing, an unexpected and a mis-shaped tensor are all named, with shapes."""
    config = diffusers_sd.vae_config(sd_reference.VAE)
    expected = diffusers_sd.expected_tensors(vae.abstract(config)[1])
    tensors = {k: np.zeros(s, np.float32) for k, s in expected.items()}
    assert set(nnx.to_pure_dict(diffusers_sd.vae_state(tensors, config))) == {
        "encoder",
        "decoder",
        "quant_conv",
        "post_quant_conv",
    }
    del tensors["decoder.conv_out.bias"]
    tensors["encoder.extra.weight"] = np.zeros((3,), np.float32)
    tensors["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(state_dict.StateDictError) as err:
        diffusers_sd.vae_state(tensors, config, "vae/x.safetensors")
    message = str(err.value)
    assert message.startswith("vae/x.safetensors: ")
    assert "1 missing: decoder.conv_out.bias (3)" in message
    assert "1 unexpected: encoder.extra.weight (3)" in message
    assert "quant_conv.weight expected (8,8,1,1) found (8,8,3,3)" in message


def test_vae_reads_old_attention_names():
    """VAE folders from diffusers < 0.15 name the mid attention query/key/value/proj_attn."""
    config = diffusers_sd.vae_config(sd_reference.VAE)
    expected = diffusers_sd.expected_tensors(vae.abstract(config)[1])
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected.items()}
    old = {
        k.replace(".to_q.", ".query.")
        .replace(".to_k.", ".key.")
        .replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): v
        for k, v in tensors.items()
    }
    assert old != tensors
    new_state, old_state = (diffusers_sd.vae_state(t, config) for t in (tensors, old))
    for a, b in zip(
        *(state_dict.jax.tree.leaves(nnx.to_pure_dict(s)) for s in (new_state, old_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"addition_embed_type": "image"}, "addition_embed_type: got 'image'; expected null or"),
        ({"attention_head_dim": [2, 4, 8]}, "attention_head_dim: 3 values for 2 levels"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 2}, "block type"),
        ({"layers_per_block": [1, 2]}, "layers_per_block: got [1, 2]; expected an int >= 1"),
        ({"some_new_field": 1}, "some_new_field: unknown UNet2DConditionModel field"),
        ({"_class_name": "UNet2DModel"}, "is not a UNet2DConditionModel"),
    ],
)
def test_unet_config_refusals_name_the_field(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        diffusers_sd.unet_config({**sd_reference.UNET_SD2, **change})


def test_configs_round_trip_through_json():
    for config in (
        diffusers_sd.unet_config(sd_reference.UNET_SD2),
        diffusers_sd.vae_config(sd_reference.VAE),
        diffusers_sd.text_encoder_config(sd_reference.TEXT),
    ):
        again = type(config).from_config(json.loads(json.dumps(config.to_config())))
        assert again == config


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd15", "sd21"])
def test_published_structures_have_the_references_tensors(version):
    """Every key and shape of the full-size SD 1.5 / 2.1 U-Net, VAE and text encoder
    (built by the reference libraries on torch's meta device: no weights)."""
    _torch()
    pytest.importorskip("transformers")
    references, unet_json, text_json = sd_reference.published_structures(version)
    ports = {
        "unet": sd_unet.abstract(diffusers_sd.unet_config(unet_json)),
        "vae": vae.abstract(diffusers_sd.vae_config(sd_reference.SD_VAE)),
        "text": clip_text.abstract(diffusers_sd.text_encoder_config(text_json)),
    }
    for name, reference in references.items():
        found = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert diffusers_sd.expected_tensors(ports[name][1]) == found, name
    params = sum(int(np.prod(s)) for s in diffusers_sd.expected_tensors(ports["unet"][1]).values())
    assert params == {"sd15": 859_520_964, "sd21": 865_910_724}[version]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SDEDIT_FULL_SIZE") != "1",
    reason="the full-size SD 1.5 U-Net (~2.5 min, ~8 GB on a 2-core CPU): SDEDIT_FULL_SIZE=1",
)
def test_full_size_sd15_unet_matches_diffusers():
    """The 860M-parameter SD 1.5 U-Net, random, converted from diffusers' state dict,
    on one 64 x 64 latent with a 77-token text."""
    torch = _torch()
    import diffusers

    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel.from_config(sd_reference.SD15_UNET).eval()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 64, 64, 4), dtype=np.float32)
    h = rng.standard_normal((1, 77, 768), dtype=np.float32)
    with torch.no_grad():
        expected = _nhwc(reference(_nchw(z), 321.0, torch.from_numpy(h)).sample)
    config = diffusers_sd.unet_config(sd_reference.SD15_UNET)
    state = diffusers_sd.unet_state(
        {k: v.numpy() for k, v in reference.state_dict().items()}, config
    )
    del reference
    err = sd_reference.rel_err(_run(sd_unet, config, state, z, np.float32(321.0), h), expected)
    print(f"full-size sd15 unet: max rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.slow
def test_fp16_variant_and_torch_bin_load_the_same_weights(tmp_path):
    """``*.fp16.safetensors`` widens to float32; ``.bin`` goes through the safe reader."""
    _torch()
    reference = sd_reference.save_vae(str(tmp_path / "st"))
    reference.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    reference.half().save_pretrained(str(tmp_path / "st"), variant="fp16")
    full = diffusers_sd.load_vae(str(tmp_path / "st"))
    assert full.weights.endswith("diffusion_pytorch_model.safetensors")
    pickled = diffusers_sd.load_vae(str(tmp_path / "bin"))
    assert pickled.weights.endswith("diffusion_pytorch_model.bin")
    half = diffusers_sd.load_vae(str(tmp_path / "st"), variant="fp16")
    assert half.weights.endswith("diffusion_pytorch_model.fp16.safetensors")
    leaves = [jax.tree.leaves(nnx.to_pure_dict(c.state)) for c in (full, pickled, half)]
    for a, b, c in zip(*leaves, strict=True):
        assert b.dtype == c.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.asarray(a).astype(np.float16).astype(np.float32), c)
    with pytest.raises(FileNotFoundError, match=r"none of the weight files .*\.bf16\."):
        diffusers_sd.load_vae(str(tmp_path / "st"), variant="bf16")
