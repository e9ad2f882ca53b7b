"""SDXL base and refiner single files in Stability's original (sgm) key layout.

The test writes each file itself from a tiny random diffusers SDXL pipeline, with its own
diffusers -> original renaming (in the manner of diffusers'
``scripts/convert_diffusers_to_original_sdxl.py``; the U-Net and VAE tables
shared with the SD 1.x test, independent of the importer's), checks first that diffusers'
own ``StableDiffusionXLImg2ImgPipeline.from_single_file`` reads it back to the pipeline's
weights, and then that sdedit_jax's model of the file, and the folder converted from it,
give the pipeline's numbers.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import sdedit_jax as sj
from sdedit_jax import convert
from sdedit_jax.importers import diffusers_sd, sdxl_single_file, state_dict
from sdedit_jax.latent import sdxl
from sdedit_jax.models import sd_unet
from sdedit_jax.tools import published_sd

torch = pytest.importorskip("torch", reason="the reference pipeline needs torch")
diffusers = pytest.importorskip("diffusers", reason="the reference pipeline is diffusers'")
pytest.importorskip("transformers", reason="the reference text encoders are transformers'")

from tests import sd_reference  # noqa: E402
from tests.test_sd_single_file import _numpy, _run, original_unet, original_vae  # noqa: E402

TOL = 1e-4
# The OpenCLIP encoder's width and (square, as ViT-bigG's, so that a projection read
# untransposed is wrong numbers, not a shape error) projection; diffusers tells the base's
# two encoders apart by their widths.
WIDTH_2 = 48
PROMPTS = ["a red barn in the snow", "an astronaut riding a horse, " * 12]
OPEN_CLIP = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
_ADDED = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
_OPEN_CLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


def original_xl_unet(tensors: dict, config: dict) -> dict:
    """SD's U-Net renaming, and the text_time embedding at ``label_emb.0``."""
    added = {k: v for k, v in tensors.items() if k.startswith("add_embedding.")}
    out = original_unet({k: v for k, v in tensors.items() if k not in added}, config)
    for key, value in added.items():
        for hf, sd in _ADDED.items():
            if key.startswith(hf):
                out["model.diffusion_model." + sd + key[len(hf) :]] = value
    assert len(out) == len(tensors)
    return out


def original_open_clip_xl(tensors: dict, prefix: str, stack=np.concatenate) -> dict:
    """OpenCLIP ViT-bigG's layout: every block, fused in_proj (query, key and value joined
    by ``stack``), the projection transposed, the logit scale (a constant of the CLIP loss)
    beside them."""
    tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    out = {
        prefix + "token_embedding.weight": tensors.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": tensors.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": tensors.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": tensors.pop("final_layer_norm.bias"),
        prefix + "text_projection": tensors.pop("text_projection.weight").T.copy(),
        prefix + "logit_scale": np.full((), 4.6, np.float32),
    }
    layers = {int(m[1]) for k in tensors if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        old, new = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            for hf, sd in _OPEN_CLIP_LAYER:
                out[f"{new}{sd}{leaf}"] = tensors.pop(f"{old}{hf}{leaf}")
            qkv = [tensors.pop(f"{old}self_attn.{n}_proj.{leaf}") for n in "qkv"]
            out[f"{new}attn.in_proj_{leaf}"] = stack(qkv, axis=0)
    assert not tensors, sorted(tensors)
    return out


def _components(pipe) -> dict:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def original_layout(weights: dict, unet_config: dict, which: str, stack=np.concatenate) -> dict:
    """A pipeline's state dicts (by component name) as one sgm state dict."""
    levels = len(weights["vae_config"]["block_out_channels"])
    tensors = {
        **original_xl_unet(weights["unet"], unet_config),
        **original_vae(weights["vae"], levels, weights["vae_config"]["layers_per_block"]),
        **original_open_clip_xl(weights["text_encoder_2"], OPEN_CLIP[which], stack),
        "denoiser.sigmas": np.linspace(0.03, 14.6, 1000, dtype=np.float32),  # sgm's buffer
    }
    if which == "base":
        text = {k.removeprefix("text_model."): v for k, v in weights["text_encoder"].items()}
        prefix = "conditioner.embedders.0.transformer.text_model."
        tensors |= {prefix + k: v for k, v in text.items()}
    return tensors


def original_file(pipe, which: str) -> dict:
    """The pipeline's weights as one sgm state dict."""
    weights = {name: _numpy(model) for name, model in _components(pipe).items()}
    weights["vae_config"] = dict(pipe.vae.config)
    return original_layout(weights, dict(pipe.unet.config), which)


@pytest.fixture(scope="module", params=["base", "refiner"])
def xl(request, tmp_path_factory):
    """(kind, config folder, single file, reference pipeline, the file's tensors)."""
    import safetensors.numpy

    which = request.param
    root = tmp_path_factory.mktemp(f"sdxl_{which}_single")
    folder = str(root / "pipeline")
    pipe = sd_reference.save_xl_pipeline(folder, refiner=which == "refiner", width_2=WIDTH_2)
    tensors = original_file(pipe, which)
    path = str(root / f"sd_xl_{which}.safetensors")
    safetensors.numpy.save_file(tensors, path)
    return which, folder, path, pipe, tensors


def test_written_file_reads_back_in_diffusers(xl):
    """The test's sgm layout is the one diffusers' from_single_file understands."""
    which, folder, path, pipe, _ = xl
    loaded = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(
        path, config=folder, local_files_only=True
    )
    expected, found = _components(pipe), _components(loaded)
    assert sorted(found) == sorted(expected)
    assert len(expected) == (3 if which == "refiner" else 4)
    for name, model in expected.items():
        want, got = model.state_dict(), found[name].state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)


def _nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _outputs(model, rng: np.random.Generator) -> dict:
    """The model's text states, pooled projection, U-Net output and VAE, on fixed inputs."""
    h, pooled = model.encode_text(model.tokenize(PROMPTS))
    z = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([801.0, 20.0], np.float32)
    ids = model.time_ids(((64, 48), (32, 32)), ((0, 8), (4, 0)), aesthetic_score=(6.0, 3.5))
    cond = model.condition(np.asarray(h), np.asarray(pooled), ids)
    x = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    return {
        "text": np.asarray(h),
        "pooled": np.asarray(pooled),
        "unet": np.asarray(_run(sd_unet, model.unet, z, t, cond)),
        "encode": np.asarray(model.encode(x)),
        "decode": np.asarray(model.decode(z[:, :8, :12])),
        "inputs": (z, t, ids, x),
    }


@pytest.mark.slow
def test_single_file_matches_the_pipeline(xl):
    """Both encoders' penultimate states, the pooled projection, the U-Net with its added
    conditioning and the VAE: all <= 1e-4 of the pipeline's output scale."""
    which, folder, path, pipe, _ = xl
    model = sj.load_model(path, config_folder=folder)
    assert isinstance(model, sdxl.SDXLModel)
    assert list(model.towers) == (
        ["text_encoder_2"] if which == "refiner" else ["text_encoder", "text_encoder_2"]
    )
    assert model.source["format"] == "sdxl_single_file"
    in_folder = {**sj.load_model(folder).description, "source_sha256": None}
    assert {**model.description, "source_sha256": None} == in_folder
    found = _outputs(model, np.random.default_rng(0))
    z, t, ids, x = found.pop("inputs")
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        h, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        added = {"text_embeds": pooled, "time_ids": torch.from_numpy(ids)}
        unet = pipe.unet(_nchw(z), torch.from_numpy(t), h, added_cond_kwargs=added).sample
        expected = {
            "text": h.numpy(),
            "pooled": pooled.numpy(),
            "unet": unet.numpy().transpose(0, 2, 3, 1),
            "encode": pipe.vae.encode(_nchw(x)).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
            * scale,
            "decode": pipe.vae.decode(_nchw(z[:, :8, :12]) / scale).sample.numpy(),
        }
    expected["decode"] = expected["decode"].transpose(0, 2, 3, 1)
    errors = {k: sd_reference.rel_err(found[k], v) for k, v in expected.items()}
    print(
        f"sdxl {which} single file: max rel err "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    assert max(errors.values()) <= TOL


def test_converted_folder_is_the_same_model(xl, tmp_path):
    """``convert`` of a single file: the same description, checksum and numbers."""
    _, folder, path, _, _ = xl
    out = str(tmp_path / "converted")
    info = convert.convert(path, out, config_folder=folder)
    assert info["latent"]["kind"] == "sdxl" and info["source"]["format"] == "sdxl_single_file"
    model, converted = sj.load_model(path, config_folder=folder), sj.load_model(out)
    assert converted.description == model.description
    assert converted.checksum == model.checksum
    a, b = _outputs(model, np.random.default_rng(1)), _outputs(converted, np.random.default_rng(1))
    for key in ("text", "pooled", "unet", "encode", "decode"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_bf16_conversion_of_the_file_is_the_folders_byte_for_byte(xl, tmp_path):
    """The file is read tensor by tensor (fused and transposed tensors too) into bfloat16:
    every weight file equals the one converted from the diffusers folder."""
    _, folder, path, _, _ = xl
    from_file, from_folder = str(tmp_path / "file"), str(tmp_path / "folder")
    file_info = convert.convert(path, from_file, config_folder=folder, with_bf16=True)
    folder_info = convert.convert(folder, from_folder, with_bf16=True)
    assert file_info["sha256"] == folder_info["sha256"]


def test_a_file_without_its_config_folder_says_what_to_pass(xl, tmp_path):
    _, _, path, _, _ = xl
    with pytest.raises(ValueError, match="single file .* pass config_folder= .*tokenizer_2/"):
        convert.convert(path, str(tmp_path / "out"))


def test_bad_file_names_every_tensor_in_one_error(xl, tmp_path):
    """A missing, an unexpected and two mis-shaped tensors, in the file's own names, in
    one line."""
    import safetensors.numpy

    which, folder, _, _, tensors = xl
    p = OPEN_CLIP[which]
    bad = dict(tensors)
    del bad[p + "ln_final.bias"]
    bad["conditioner.embedders.2.model.extra"] = np.zeros(3, np.float32)
    bad[p + "text_projection"] = np.zeros((WIDTH_2, 40), np.float32)
    bad["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((8, 8), np.float32)
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(bad, path)
    with pytest.raises(state_dict.StateDictError) as err:
        sj.load_model(path, config_folder=folder)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert f"1 missing: {p}ln_final.bias ({WIDTH_2})" in message
    assert "1 unexpected: conditioner.embedders.2.model.extra (3)" in message
    assert "2 mis-shaped: " in message
    assert f"{p}text_projection expected ({WIDTH_2},{WIDTH_2}) found ({WIDTH_2},40)" in message
    assert "model.diffusion_model.label_emb.0.0.weight expected (" in message


def _leaves(part) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(part.state))]


def test_architecture_inferred_from_the_tensors(xl, tmp_path):
    """With only the tokenizers beside it, the file gives the folder's architecture (but
    for what the tensors do not hold: native size, and head counts, which follow 64
    channels per head), the same weights and the published folders' flags."""
    which, folder, path, pipe, _ = xl
    tokens = tmp_path / "tokens"
    for name in ("tokenizer", "tokenizer_2"):
        if (Path(folder) / name).is_dir():
            shutil.copytree(Path(folder) / name, tokens / name)
    inferred = sj.load_model(path, config_folder=str(tokens))
    given = sj.load_model(path, config_folder=folder)
    assert inferred.requires_aesthetics_score == pipe.config.requires_aesthetics_score
    assert inferred.force_zeros_for_empty_prompt == pipe.config.force_zeros_for_empty_prompt
    assert inferred.scaling_factor == given.scaling_factor == 0.13025
    unet = inferred.unet.config
    assert unet.sample_size == 128 and unet.attention_heads == (1, 1)  # the tiny one: 2 and 4
    heads = {"attention_heads": given.unet.config.attention_heads, "sample_size": 16}
    assert dataclasses.replace(unet, **heads) == given.unet.config
    assert dataclasses.replace(inferred.vae.config, sample_size=32) == given.vae.config
    assert list(inferred.towers) == list(given.towers)
    for name, tower in inferred.towers.items():
        config = given.towers[name].part.config
        assert tower.part.config.num_attention_heads == 1  # 32 and 48 channels: 4 in the folder
        assert dataclasses.replace(tower.part.config, num_attention_heads=4) == config
        for a, b in zip(_leaves(tower.part), _leaves(given.towers[name].part), strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(inferred.unet), _leaves(given.unet), strict=True):
        np.testing.assert_array_equal(a, b)


def _shapes(model) -> dict:
    return {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()
    }


def _stacked_shape(parts, axis: int = 0):
    """The shape of the fused in_proj, without the memory (zero strides)."""
    rows = sum(p.shape[0] for p in parts)
    return np.broadcast_to(np.float32(0), (rows, *parts[0].shape[1:]))


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_published_architectures_inferred_from_their_tensors(which):
    """Full-size SDXL base and refiner (built on torch's meta device, written in sgm's
    layout as zero-stride arrays) give the published configs back."""
    import transformers

    unet_json = {"base": published_sd.SDXL_UNET, "refiner": published_sd.SDXL_REFINER_UNET}[which]
    texts = {"text_encoder_2": published_sd.OPENCLIP_BIGG}
    if which == "base":
        texts["text_encoder"] = published_sd.CLIP_VIT_L
    with torch.device("meta"):
        models = {
            "unet": diffusers.UNet2DConditionModel.from_config(unet_json),
            "vae": diffusers.AutoencoderKL.from_config(published_sd.SDXL_VAE),
        }
        for name, config in texts.items():
            fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
            cls = transformers.CLIPTextModel
            if name == "text_encoder_2":
                cls = transformers.CLIPTextModelWithProjection
            models[name] = cls(transformers.CLIPTextConfig(**fields))
    weights = {name: _shapes(model) for name, model in models.items()}
    weights["vae_config"] = published_sd.SDXL_VAE
    tensors = original_layout(weights, unet_json, which, _stacked_shape)
    configs = sdxl_single_file.infer_configs(tensors)
    expected = diffusers_sd.unet_config(unet_json)
    if which == "refiner":  # its levels without attention read no depth (published: 4)
        expected = dataclasses.replace(expected, transformer_layers_per_block=(1, 4, 4, 1))
    assert configs["unet"] == expected
    assert configs["vae"] == diffusers_sd.vae_config(published_sd.SDXL_VAE)
    for name, config in texts.items():
        assert configs[name] == diffusers_sd.text_encoder_config(config), name
