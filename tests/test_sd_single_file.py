"""Single-file SD 1.x checkpoints in the original (CompVis ldm) key layout.

The test writes the file itself from tiny random diffusers/transformers components, with
its own diffusers -> original renaming (tables in the style of diffusers' old
``convert_diffusers_to_original_stable_diffusion.py``, independent of the importer's),
checks that diffusers' own ``from_single_file`` reads it back to the same components, and
then that the importer gives the reference's outputs within 1e-4 of the output scale.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx

from sdedit_jax.importers import diffusers_sd, sd_single_file, state_dict
from sdedit_jax.models import clip_text, sd_unet, vae
from tests import sd_reference

TOL = 1e-4


def _unet_map(levels: int, layers: int, down_attn, up_attn) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for a U-Net of ``levels`` levels."""
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    n = layers + 1
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n * i + j + 1}.0."))
            if down_attn[i]:
                pairs.append(
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n * i + j + 1}.1.")
                )
        for j in range(n):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n * i + j}.0."))
            if up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n * i + j}.1."))
        if i < levels - 1:
            pairs.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{n * (i + 1)}.0.op.")
            )
            index = 2 if up_attn[i] else 1
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n * i + layers}.{index}.")
            )
    return pairs


_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def original_unet(tensors: dict, config: dict) -> dict:
    levels = len(config["block_out_channels"])
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    pairs = _unet_map(levels, config["layers_per_block"], down_attn, up_attn)
    out = {}
    for key, value in tensors.items():
        new = key
        for hf, sd in pairs:
            if new.startswith(hf):
                rest = new[len(hf) :]
                if ".resnets." in hf or hf.startswith("mid_block.resnets"):
                    for a, b in _RESNET:
                        rest = rest.replace(a, b, 1) if rest.startswith(a) else rest
                new = sd + rest
                break
        else:
            raise AssertionError(f"unmapped U-Net key {key}")
        out["model.diffusion_model." + new] = value
    return out


def original_vae(tensors: dict, levels: int, layers: int) -> dict:
    pairs = [("mid_block.attentions.0.", "mid.attn_1."), ("conv_norm_out.", "norm_out.")]
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(layers + 1):
            pairs.append(
                (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.")
            )
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"up.{levels - 1 - i}.upsample."))
    pairs += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v.")]
    attention.append(("to_out.0.", "proj_out."))
    out = {}
    for key, value in tensors.items():
        new = key
        for hf, sd in pairs:
            new = new.replace(hf, sd)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for hf, sd in attention:
                new = new.replace(".attn_1." + hf, ".attn_1." + sd)
            if new.endswith(".weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def original_text(tensors: dict) -> dict:
    return {f"cond_stage_model.transformer.text_model.{k}": v for k, v in tensors.items()}


def original_open_clip(tensors: dict, layers: int, rng) -> dict:
    """SD 2.x's OpenCLIP layout, with what ldm keeps beside the layers SD 2.x reads: one
    more residual block, the text projection and the logit scale."""
    p = "cond_stage_model.model."
    out = {
        p + "token_embedding.weight": tensors["embeddings.token_embedding.weight"],
        p + "positional_embedding": tensors["embeddings.position_embedding.weight"],
        p + "ln_final.weight": tensors["final_layer_norm.weight"],
        p + "ln_final.bias": tensors["final_layer_norm.bias"],
    }
    width = out[p + "ln_final.weight"].shape[0]
    names = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc")]
    names += [("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]
    for i in range(layers + 1):
        old, new = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            if i == layers:  # the block past the penultimate layer: random, never read
                for _, name in names:
                    out[f"{new}{name}.{leaf}"] = rng.standard_normal(
                        out[f"{p}transformer.resblocks.0.{name}.{leaf}"].shape
                    ).astype(np.float32)
                shape = out[f"{p}transformer.resblocks.0.attn.in_proj_{leaf}"].shape
                out[f"{new}attn.in_proj_{leaf}"] = rng.standard_normal(shape).astype(np.float32)
                continue
            for hf, sd in names:
                out[f"{new}{sd}.{leaf}"] = tensors[f"{old}{hf}.{leaf}"]
            qkv = [tensors[f"{old}self_attn.{n}_proj.{leaf}"] for n in "qkv"]
            out[f"{new}attn.in_proj_{leaf}"] = np.concatenate(qkv, axis=0)
    out[p + "text_projection"] = rng.standard_normal((width, 16)).astype(np.float32)
    out[p + "logit_scale"] = np.full((), 4.6, np.float32)
    return out


def _numpy(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write(folder, structure: str) -> tuple[str, dict, dict]:
    """A tiny SD folder saved by diffusers/transformers, and its weights in one original file."""
    import safetensors.numpy

    unet_config = {"sd1": sd_reference.UNET_SD1, "sd2": sd_reference.UNET_SD2}[structure]
    act = {"sd1": "quick_gelu", "sd2": "gelu"}[structure]
    models = {
        "unet": sd_reference.save_unet(str(folder / "unet"), unet_config),
        "vae": sd_reference.save_vae(str(folder / "vae")),
        "text_encoder": sd_reference.save_text_encoder(str(folder / "text_encoder"), act),
    }
    text = _numpy(models["text_encoder"])
    if structure == "sd2":
        text = original_open_clip(
            text, sd_reference.TEXT["num_hidden_layers"], np.random.default_rng(5)
        )
    else:
        text = original_text(text)
    tensors = {
        **original_unet(_numpy(models["unet"]), unet_config),
        **original_vae(_numpy(models["vae"]), 2, sd_reference.VAE["layers_per_block"]),
        **text,
        "alphas_cumprod": np.ones(1000, np.float32),  # an ldm schedule buffer, not a weight
    }
    path = str(folder / f"{structure}.safetensors")
    safetensors.numpy.save_file(tensors, path)
    return path, models, tensors


def _references():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """SD 1.x: the folder, the file, the reference models and the file's tensors."""
    _references()
    folder = tmp_path_factory.mktemp("sd1")
    return folder, *_write(folder, "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """SD 2.x (OpenCLIP text encoder, linear projections, per-level heads)."""
    _references()
    folder = tmp_path_factory.mktemp("sd2")
    return folder, *_write(folder, "sd2")


def _same_weights(model, reference) -> None:
    found, expected = model.state_dict(), reference.state_dict()
    assert set(found) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(found[key].numpy(), value.numpy(), err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["sd1", "sd2"])
def test_written_file_reads_back_in_diffusers(structure, request):
    """The test's original layout is the one diffusers' from_single_file understands."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from diffusers.loaders import single_file_utils

    folder, path, models, tensors = request.getfixturevalue(structure)
    options = {"config": str(folder), "local_files_only": True}
    unet = diffusers.UNet2DConditionModel.from_single_file(path, subfolder="unet", **options)
    _same_weights(unet, models["unet"])
    autoencoder = diffusers.AutoencoderKL.from_single_file(path, subfolder="vae", **options)
    _same_weights(autoencoder, models["vae"])
    # CLIPTextModel has no from_single_file: the function diffusers' pipelines call for it.
    text = single_file_utils.create_diffusers_clip_model_from_ldm(
        transformers.CLIPTextModel,
        {k: torch.from_numpy(v) for k, v in tensors.items()},
        subfolder="text_encoder",
        **options,
    )
    _same_weights(text, models["text_encoder"])


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x) -> np.ndarray:
    return np.asarray(x.detach().numpy()).transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_call(graphdef: nnx.GraphDef, method: str, state: nnx.State, *args):
    net = nnx.merge(graphdef, state)
    return getattr(net, method)(*args) if method else net(*args)


def _run(module, component, *args, method: str = ""):
    return _jit_call(module.abstract(component.config)[0], method, component.state, *args)


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["sd1", "sd2"])
def test_single_file_matches_the_reference_components(structure, request):
    """U-Net output, VAE encode mean and decode, text embeddings: all <= 1e-4 of scale."""
    torch = pytest.importorskip("torch")

    folder, path, models, _ = request.getfixturevalue(structure)
    loaded = sd_single_file.load(path, str(folder))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    t = np.array([999.0, 17.5], np.float32)
    h = rng.standard_normal((2, 7, 32), dtype=np.float32)
    x = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 8, 12, 4), dtype=np.float32)
    ids = rng.integers(0, 1000, (2, 77))
    ids[:, 0], ids[0, 9:] = 998, 999
    with torch.no_grad():
        expected = {
            "unet": _nhwc(
                models["unet"](_nchw(z), torch.from_numpy(t), torch.from_numpy(h)).sample
            ),
            "encode": _nhwc(models["vae"].encode(_nchw(x)).latent_dist.mean),
            "decode": _nhwc(models["vae"].decode(_nchw(latents)).sample),
            "text": models["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy(),
        }
    found = {
        "unet": _run(sd_unet, loaded["unet"], z, t, {"text": h}),
        "encode": _run(vae, loaded["vae"], x, method="encode")[0],
        "decode": _run(vae, loaded["vae"], latents, method="decode"),
        "text": _run(clip_text, loaded["text_encoder"], ids),
    }
    errors = {k: sd_reference.rel_err(found[k], expected[k]) for k in expected}
    print(
        f"{structure} single file: max rel err "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    assert max(errors.values()) <= TOL
    assert loaded["vae"].config.scaling_factor == pytest.approx(0.13025)
    assert {c.weights for c in loaded.values()} == {path}


def _leaves(component) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(component.state))]


def _assert_same(a, b) -> None:
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_ckpt_through_the_safe_reader_with_and_without_ema(sd1, tmp_path):
    """A Lightning ``.ckpt`` ({"state_dict": ...}) loads the same weights; its
    ``model_ema.*`` copy replaces the U-Net's unless ema=False."""
    torch = pytest.importorskip("torch")
    folder, path, _, tensors = sd1
    from_safetensors = sd_single_file.load(path, str(folder))
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + k[len("model.") :].replace(".", ""): tensors[k] for k in unet_keys}
    raw = {k: torch.from_numpy(v) for k, v in tensors.items()}
    raw |= {k: torch.zeros_like(raw[k]) for k in unet_keys}  # training weights differ
    raw |= {k: torch.from_numpy(v) for k, v in ema.items()}
    raw["model_ema.decay"] = torch.tensor(0.9999)
    raw["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    ckpt = str(tmp_path / "sd1.ckpt")
    torch.save({"state_dict": raw, "global_step": 7}, ckpt)
    with_ema = sd_single_file.load(ckpt, str(folder))
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(with_ema[name], from_safetensors[name])
    without = sd_single_file.load(ckpt, str(folder), ema=False)
    assert all(not np.any(x) for x in _leaves(without["unet"]))
    _assert_same(without["vae"], from_safetensors["vae"])


def test_bad_file_names_every_key_in_one_error(sd1, tmp_path):
    """A removed, an extra and a mis-shaped tensor, in the file's own (original) names."""
    import safetensors.numpy

    folder, _, _, tensors = sd1
    bad = dict(tensors)
    del bad["first_stage_model.decoder.norm_out.bias"]
    bad["model.diffusion_model.extra.weight"] = np.zeros(3, np.float32)
    bad["model.diffusion_model.out.2.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(bad, path)
    with pytest.raises(state_dict.StateDictError) as err:
        sd_single_file.load(path, str(folder))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert "1 missing: first_stage_model.decoder.norm_out.bias (32)" in message
    assert "1 unexpected: model.diffusion_model.extra.weight (3)" in message
    assert re.search(
        r"1 mis-shaped: model\.diffusion_model\.out\.2\.weight expected \(4,32,3,3\) found "
        r"\(4,32,1,1\)",
        message,
    )


def test_bad_open_clip_file_names_every_key(sd2, tmp_path):
    """SD 2.x: a fused in_proj of the wrong size and a block past the one ldm keeps."""
    import safetensors.numpy

    folder, _, _, tensors = sd2
    p = "cond_stage_model.model."
    bad = dict(tensors)
    del bad[p + "ln_final.bias"]
    bad[p + "transformer.resblocks.3.ln_1.weight"] = np.zeros(32, np.float32)
    bad[p + "transformer.resblocks.1.attn.in_proj_weight"] = np.zeros((64, 32), np.float32)
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(bad, path)
    with pytest.raises(state_dict.StateDictError) as err:
        sd_single_file.load(path, str(folder))
    message = str(err.value)
    assert f"1 missing: {p}ln_final.bias (32)" in message
    assert f"1 unexpected: {p}transformer.resblocks.3.ln_1.weight (32)" in message
    assert f"{p}transformer.resblocks.1.attn.in_proj_weight expected (96,32) found (64,32)" in (
        message
    )


@pytest.mark.parametrize("structure", ["sd1", "sd2"])
def test_architecture_inferred_from_the_tensors(structure, request):
    """Without a config folder, the tensors give the folder's configs (but for what the
    tensors do not hold: native size, scaling factor, and SD 2.x's head counts, which
    follow ldm's 64 channels per head) and the same weights."""
    folder, path, _, _ = request.getfixturevalue(structure)
    given = sd_single_file.configs_from(str(folder))
    inferred = sd_single_file.load(path)
    unet = inferred["unet"].config
    assert unet.sample_size == 64 and inferred["vae"].config.scaling_factor == 0.18215
    if structure == "sd2":  # the tiny SD 2.x U-Net has 2 and 4 heads, not 1 per 64 channels
        assert unet.attention_heads == (1, 1)
        unet = dataclasses.replace(unet, attention_heads=given["unet"].attention_heads)
    assert dataclasses.replace(unet, sample_size=given["unet"].sample_size) == given["unet"]
    assert (
        dataclasses.replace(
            inferred["vae"].config, scaling_factor=given["vae"].scaling_factor, sample_size=32
        )
        == given["vae"]
    )
    text = inferred["text_encoder"].config
    assert text.num_attention_heads == 1  # 32 channels: one head by ldm's rule, 4 in the folder
    assert dataclasses.replace(text, num_attention_heads=4) == given["text_encoder"]
    tensors = sd_single_file.read_tensors(path)
    by_folder = sd_single_file.split_tensors(path, tensors, given)
    by_tensors = sd_single_file.split_tensors(path, tensors, sd_single_file.infer_configs(tensors))
    for name, weights in by_folder.items():
        assert by_tensors[name].keys() == weights.keys()
        for key, value in weights.items():
            np.testing.assert_array_equal(by_tensors[name][key], value)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd15", "sd21"])
def test_published_architectures_inferred_from_their_tensors(version):
    """The full-size SD 1.5 / SD 2.1 structures (built on torch's meta device, written
    in the original layout as zero-stride arrays) give the published configs back."""
    for module in ("torch", "transformers", "diffusers", "safetensors"):
        pytest.importorskip(module)
    models, unet_json, text_json = sd_reference.published_structures(version)
    unet, autoencoder, text = models["unet"], models["vae"], models["text"]

    def shapes(model):
        return {
            k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()
        }

    tensors = {
        **original_unet(shapes(unet), unet_json),
        **original_vae(shapes(autoencoder), 4, sd_reference.SD_VAE["layers_per_block"]),
    }
    if version == "sd21":
        tensors |= original_open_clip(shapes(text), 23, np.random.default_rng(0))
    else:
        tensors |= original_text(shapes(text))
    configs = sd_single_file.infer_configs(tensors)
    expected_unet = diffusers_sd.unet_config(unet_json)
    assert (
        dataclasses.replace(configs["unet"], sample_size=expected_unet.sample_size) == expected_unet
    )
    assert configs["vae"] == diffusers_sd.vae_config(sd_reference.SD_VAE)
    assert configs["text_encoder"] == diffusers_sd.text_encoder_config(text_json)
