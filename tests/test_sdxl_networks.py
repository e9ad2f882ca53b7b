"""SDXL's U-Net (base and refiner structures) against diffusers: the text_time embedding of
pooled text and micro-conditioning time ids on top of SD's U-Net."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from sdedit_jax.importers import diffusers_sd
from sdedit_jax.latent import micro_conditioning
from sdedit_jax.models import clip_text, sd_unet, vae
from sdedit_jax.models.architecture import UnsupportedConfig
from sdedit_jax.tools import published_sd
from tests import sd_reference
from tests.test_sd_networks import TOL, _nchw, _nhwc, _run

torch = pytest.importorskip("torch", reason="the reference U-Net needs torch")
pytest.importorskip("diffusers", reason="the reference U-Net is diffusers'")


@pytest.mark.parametrize("structure", ["base", "refiner"])
def test_sdxl_unet_matches_diffusers_with_added_conditioning(tmp_path, structure):
    config = {"base": sd_reference.UNET_SDXL, "refiner": sd_reference.UNET_SDXL_REFINER}[structure]
    reference = sd_reference.save_unet(str(tmp_path), config)
    unet = diffusers_sd.load_unet(str(tmp_path))
    assert unet.config.down_cross_attention == (False, True)
    ids = 6 if structure == "base" else 5
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)
    t = np.array([981.0, 3.0], np.float32)
    h = rng.standard_normal((2, 7, config["cross_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((2, 32), dtype=np.float32)
    # Sizes, crops and aesthetic scores as the pipelines send them (floats of pixels).
    time_ids = np.array([[1024, 768, 0, 16, 1024, 1024][:ids], [512, 512, 8, 0, 6.0, 768][:ids]])
    time_ids = time_ids.astype(np.float32)
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        expected = reference(
            _nchw(z), torch.from_numpy(t), torch.from_numpy(h), added_cond_kwargs=added
        ).sample
    cond = {"text": h, "text_embeds": pooled, "time_ids": time_ids}
    err = sd_reference.rel_err(_run(sd_unet, unet.config, unet.state, z, t, cond), _nhwc(expected))
    print(f"sdxl {structure} unet: max rel err {err:.2e}")
    assert err <= TOL
    # The added embedding matters: other time ids give another output.
    other = {**cond, "time_ids": time_ids + 64}
    assert (
        sd_reference.rel_err(_run(sd_unet, unet.config, unet.state, z, t, other), _nhwc(expected))
        > 1e-3
    )
    with pytest.raises(ValueError, match=r"needs cond\['text_embeds'\] and cond\['time_ids'\]"):
        _run(sd_unet, unet.config, unet.state, z, t, {"text": h})
    with pytest.raises(ValueError, match=r"the added embedding takes"):
        _run(sd_unet, unet.config, unet.state, z, t, {**cond, "time_ids": time_ids[:, :4]})


def test_text_time_fields_come_together():
    base = {k: v for k, v in sd_reference.UNET_SDXL.items()}
    with pytest.raises(
        UnsupportedConfig, match="^projection_class_embeddings_input_dim: .*needs it"
    ):
        diffusers_sd.unet_config({**base, "projection_class_embeddings_input_dim": None})
    with pytest.raises(UnsupportedConfig, match="^addition_time_embed_dim: set without"):
        diffusers_sd.unet_config(
            {**base, "addition_embed_type": None, "projection_class_embeddings_input_dim": None}
        )
    with pytest.raises(
        ValueError, match="^addition_embed_type: got 'text'; expected null or 'text_time'"
    ):
        diffusers_sd.unet_config({**base, "addition_embed_type": "text"})


@pytest.mark.parametrize("eos_token_id", [2, 997])
def test_penultimate_states_and_pooled_projection_match_transformers(tmp_path, eos_token_id):
    """SDXL's text_encoder_2: hidden_states[-2] and text_embeds; the pooled state at the
    largest id (eos_token_id 2, as the converted OpenCLIP configs say) or at the token."""
    pytest.importorskip("transformers", reason="the reference text encoder is transformers'")
    reference = sd_reference.save_text_encoder_with_projection(str(tmp_path), eos_token_id)
    encoder = diffusers_sd.load_text_encoder(str(tmp_path))
    assert encoder.config.projection_dim == 24
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 990, (3, 11)).astype(np.int64)
    ids[:, 0] = 998
    end = 999 if eos_token_id == 2 else eos_token_id
    ids[0, 5:], ids[1, 9:], ids[2, 10:] = end, end, end  # padded with the end token
    ids[1, 3] = 999  # the largest id before row 1's end: where the two rules differ
    with torch.no_grad():
        out = reference(torch.from_numpy(ids), output_hidden_states=True)
    net = nnx.merge(clip_text.abstract(encoder.config)[0], encoder.state)
    hidden, pooled = net.encode(ids.astype(np.int32), skip=1)
    assert sd_reference.rel_err(hidden, out.hidden_states[-2].numpy()) <= TOL
    assert sd_reference.rel_err(pooled, out.text_embeds.numpy()) <= TOL
    last, _ = net.encode(ids.astype(np.int32), skip=0)
    assert sd_reference.rel_err(last, out.last_hidden_state.numpy()) <= TOL


@pytest.mark.parametrize("refiner", [False, True])
def test_time_ids_are_the_pipelines(refiner):
    """``time_ids`` == StableDiffusionXLImg2ImgPipeline._get_add_time_ids, per example."""
    import types

    from diffusers import StableDiffusionXLImg2ImgPipeline

    ids = 5 if refiner else 6
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(requires_aesthetics_score=refiner),
        unet=types.SimpleNamespace(
            config=types.SimpleNamespace(addition_time_embed_dim=8),
            add_embedding=types.SimpleNamespace(
                linear_1=types.SimpleNamespace(in_features=32 + ids * 8)
            ),
        ),
    )
    rows = [((1024, 768), (0, 16), (1024, 1024), 6.0), ((512, 640), (8, 0), (768, 768), 2.5)]
    expected = [
        StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
            fake, o, c, t, a, 2.5, o, c, t, torch.float32, text_encoder_projection_dim=32
        )[0].numpy()[0]
        for o, c, t, a in rows
    ]
    original, crops, targets, scores = (np.array([r[i] for r in rows]) for i in range(4))
    if refiner:
        found = micro_conditioning.time_ids(original, crops, aesthetic_score=scores)
    else:
        found = micro_conditioning.time_ids(original, crops, targets)
    np.testing.assert_array_equal(found, np.stack(expected))
    # One value for the whole batch broadcasts; a missing or doubled last field is refused.
    assert micro_conditioning.time_ids((64, 64), (0, 0), (64, 64)).shape == (1, 6)
    with pytest.raises(ValueError, match="target_size .base. or aesthetic_score"):
        micro_conditioning.time_ids((64, 64), (0, 0))
    with pytest.raises(ValueError, match="^crops_coords_top_left: 3 rows for a batch of 2$"):
        micro_conditioning.time_ids(original, np.zeros((3, 2)), targets)


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["base", "refiner"])
def test_published_sdxl_structures_have_the_references_tensors(structure):
    """Every key and shape of the full-size SDXL U-Net (base 2.6B, refiner 2.3B), its VAE
    and its text encoders, built by the reference libraries on torch's meta device."""
    import diffusers
    import transformers

    unet_json = {"base": published_sd.SDXL_UNET, "refiner": published_sd.SDXL_REFINER_UNET}
    texts = {"text_encoder_2": published_sd.OPENCLIP_BIGG}
    if structure == "base":
        texts["text_encoder"] = published_sd.CLIP_VIT_L

    def text_model(config):
        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        cls = transformers.CLIPTextModel
        if "architectures" in config:
            cls = transformers.CLIPTextModelWithProjection
        return cls(transformers.CLIPTextConfig(**fields))

    with torch.device("meta"):
        references = {
            "unet": diffusers.UNet2DConditionModel.from_config(unet_json[structure]),
            "vae": diffusers.AutoencoderKL.from_config(published_sd.SDXL_VAE),
            **{name: text_model(config) for name, config in texts.items()},
        }
    ports = {
        "unet": sd_unet.abstract(diffusers_sd.unet_config(unet_json[structure])),
        "vae": vae.abstract(diffusers_sd.vae_config(published_sd.SDXL_VAE)),
        **{n: clip_text.abstract(diffusers_sd.text_encoder_config(c)) for n, c in texts.items()},
    }
    for name, reference in references.items():
        found = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        found = {k.removeprefix("text_model."): v for k, v in found.items()}
        found = {k: v for k, v in found.items() if k != "embeddings.position_ids"}
        assert diffusers_sd.expected_tensors(ports[name][1]) == found, name
    params = sum(int(np.prod(s)) for s in diffusers_sd.expected_tensors(ports["unet"][1]).values())
    print(f"sdxl {structure} unet: {params:,} parameters")
    assert params == sum(p.numel() for p in references["unet"].parameters())
