"""The DDPM U-Net port against diffusers' UNet2DModel (torch) with random weights.

The reference is built with the block structure of google/ddpm-ema-church-256
(channels narrowed, 32 px, for CPU time), saved with diffusers' own
``save_pretrained`` and read back by sdedit_jax from the files.
"""

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import ddpm_reference as ref  # noqa: E402

from sdedit_jax import pretrained  # noqa: E402
from sdedit_jax.importers import diffusers_ddpm, torch_checkpoint  # noqa: E402
from sdedit_jax.models import ddpm_unet  # noqa: E402
from sdedit_jax.models.ddpm_unet import DDPMUNetConfig, UnsupportedConfig  # noqa: E402

TOL = 1e-4  # max |jax - torch| relative to max |torch|


@pytest.fixture(scope="module")
def church_small(tmp_path_factory):
    model = ref.diffusers_model(ref.church_config())
    folder = tmp_path_factory.mktemp("church_small")
    model.save_pretrained(folder)  # safetensors
    return model, str(folder)


def _rel_err(out, expected):
    return np.abs(np.asarray(out) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize(
    "timesteps",
    [np.array([0.0]), np.array([999.0, 17.5, 500.0])],
    ids=["batch1_t0", "batch3_mixed_float"],
)
@pytest.mark.slow
def test_matches_diffusers(church_small, timesteps):
    model, folder = church_small
    net = pretrained.load_network(folder)
    x = np.random.default_rng(1).standard_normal((len(timesteps), 32, 32, 3), np.float32)
    expected = ref.reference(model, x, timesteps.astype(np.float32))
    assert _rel_err(net(x, timesteps), expected) <= TOL


def test_scalar_timestep_is_broadcast_like_diffusers(church_small):
    model, folder = church_small
    net = pretrained.load_network(folder)
    x = np.random.default_rng(2).standard_normal((3, 32, 32, 3), np.float32)
    expected = ref.reference(model, x, np.array(250, np.int64))  # integer scalar
    assert _rel_err(net(x, 250), expected) <= TOL


@pytest.mark.slow
def test_bfloat16_compute_is_close_and_returns_float32(church_small):
    model, folder = church_small
    net = pretrained.load_network(folder, compute_dtype="bfloat16")
    x = np.random.default_rng(3).standard_normal((3, 32, 32, 3), np.float32)
    t = np.array([999.0, 17.5, 500.0])
    out = net(x, t)
    assert out.dtype == np.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(net.state)} == {np.dtype(np.float32)}
    assert 1e-4 < _rel_err(out, ref.reference(model, x, t.astype(np.float32))) < 0.05


def test_church_config_from_diffusers_and_from_ddim_yaml_agree():
    # SDEdit's configs/church.yml model section with data.image_size 256.
    ddim_model = {
        "type": "simple",
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [16],
        "dropout": 0.0,
        "var_type": "fixedsmall",
        "ema_rate": 0.999,
        "ema": True,
        "resamp_with_conv": True,
    }
    from_ddim = torch_checkpoint.config_from_ddim(ddim_model, image_size=256)
    from_diffusers = diffusers_ddpm.config_from_diffusers(ref.CHURCH_256)
    assert from_ddim == from_diffusers
    assert from_diffusers.down_attention == (False,) * 4 + (True, False)
    assert DDPMUNetConfig.from_config(from_ddim.to_config()) == from_ddim
    assert torch_checkpoint.config_from_ddim({**ddim_model, "resolution": 256}) == from_ddim


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"down_block_types": ["DownBlock2D"] * 5 + ["CrossAttnDownBlock2D"]},
            "down_block_types: block type 'CrossAttnDownBlock2D' is not supported",
        ),
        (
            {"up_block_types": ["UpBlock2D"] * 5 + ["SomeUpBlock"]},
            "up_block_types: block type 'SomeUpBlock' is not supported",
        ),
        ({"act_fn": "gelu"}, "act_fn: 'gelu' is not supported"),
        (
            {"resnet_time_scale_shift": "scale_shift"},
            "resnet_time_scale_shift: 'scale_shift' is not supported",
        ),
        ({"class_embed_type": "timestep"}, "class_embed_type: 'timestep' is not supported"),
        ({"new_field": 1}, "new_field: unknown UNet2DModel field"),
        ({"_class_name": "UNet2DConditionModel"}, "_class_name: 'UNet2DConditionModel'"),
        ({"block_out_channels": [128, 128, 256]}, "block_out_channels: 3 levels but 6 down"),
        (
            {"block_out_channels": [128, 128, 256, 256, 512, 500]},
            "block_out_channels: 500 is not divisible by norm_num_groups=32",
        ),
        ({"sample_size": [256, 128]}, r"sample_size: \[256, 128\] is not square"),
    ],
)
def test_unsupported_diffusers_config_names_field_and_value(change, message):
    with pytest.raises(UnsupportedConfig, match=message):
        diffusers_ddpm.config_from_diffusers({**ref.CHURCH_256, **change})


def test_diffusers_defaults_apply_to_missing_fields():
    # UNet2DModel defaults flip_sin_to_cos=True, freq_shift=0: a config without them is
    # that variant, which the port also computes.
    cfg = {k: v for k, v in ref.CHURCH_256.items() if k not in ("flip_sin_to_cos", "freq_shift")}
    config = diffusers_ddpm.config_from_diffusers(cfg)
    assert (config.flip_sin_to_cos, config.freq_shift) == (True, 0.0)


@pytest.mark.slow
def test_flipped_embedding_and_multihead_variant_match_diffusers(tmp_path):
    cfg = {
        **ref.church_config(sample_size=16, channels=(32, 64, 64)),
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "attention_head_dim": 16,
        "downsample_padding": 1,
    }
    model = ref.diffusers_model(cfg, seed=5)
    model.save_pretrained(tmp_path)
    net = pretrained.load_network(str(tmp_path))
    x = np.random.default_rng(4).standard_normal((2, 16, 16, 3), np.float32)
    t = np.array([3.0, 640.0], np.float32)
    assert _rel_err(net(x, t), ref.reference(model, x, t)) <= TOL


def test_ddim_config_rejects_other_model_types():
    with pytest.raises(UnsupportedConfig, match="type: 'bayesian' is not supported"):
        torch_checkpoint.config_from_ddim(
            {
                "type": "bayesian",
                "ch": 128,
                "ch_mult": [1, 2],
                "num_res_blocks": 2,
                "attn_resolutions": [16],
            },
            image_size=32,
        )
    with pytest.raises(UnsupportedConfig, match="compute_dtype: must be one of"):
        dataclasses.replace(DDPMUNetConfig(), compute_dtype="float16")


def test_folders_of_earlier_versions_load_and_other_unknown_fields_fail():
    # Earlier conversions recorded the checkpoint's training dropout in model_info.json.
    written = {**DDPMUNetConfig().to_config(), "dropout": 0.1}
    assert DDPMUNetConfig.from_config(written) == DDPMUNetConfig()
    with pytest.raises(UnsupportedConfig, match="model.dropuot: unknown field"):
        DDPMUNetConfig.from_config({**DDPMUNetConfig().to_config(), "dropuot": 0.1})


@pytest.mark.slow
def test_full_size_church_256(tmp_path):
    """The exact ddpm-ema-church-256 network: 113.7M parameters, converted, run at 256^2."""
    model = ref.diffusers_model(ref.CHURCH_256, seed=7)
    torch_params = sum(p.numel() for p in model.parameters())
    assert round(torch_params / 1e6, 1) == 113.7
    model.save_pretrained(tmp_path / "hub", safe_serialization=False)  # .bin, like the hub
    from sdedit_jax import convert

    convert.convert(str(tmp_path / "hub"), str(tmp_path / "model"))
    net = pretrained.load_network(str(tmp_path / "model"))
    assert ddpm_unet.count_params(net.state) == torch_params
    x = np.random.default_rng(5).standard_normal((1, 256, 256, 3), np.float32)
    t = np.array([421.0], np.float32)
    assert _rel_err(net(x, t), ref.reference(model, x, t)) <= TOL
