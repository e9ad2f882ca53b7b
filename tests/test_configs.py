"""The shipped configs: shared blocks, variant arguments, tiny configs derived from full ones.

Truth: the values the configs documented before they shared blocks (the demo's sampler,
the shipped model's network), and big_vision's ``key=value,flag`` variant grammar.
"""

import os

import pytest

from sdedit_jax.util.config import load_config, load_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configs_load_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/default.py")
    assert config.sampler.predictor == "sde_dpm_solver_2m"
    assert config.sampler.steps_per_unit_time == 100
    assert load_config("configs/default.py:quick").sampler.steps_per_unit_time == 20


def test_variants_combine_and_take_typed_values():
    config = load_config("configs/eval_emoji.py:quick,tasks")
    assert config.max_guides == 32 and "composite" in config.tasks
    assert load_config("configs/eval_emoji.py:quick=false").max_guides == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("configs/default.py:fast", r"configs/default.py: unknown variant 'fast' \(known: quick\)"),
        ("configs/train_tiny.py:quick", r"configs/train_tiny.py: unknown variant 'quick'"),
        ("configs/eval_emoji.py:quick=maybe", r"variant quick='maybe' is not a boolean"),
    ],
)
def test_bad_variants_are_one_line_errors_naming_file_and_variant(spec, message):
    with pytest.raises(ValueError, match=message):
        load_config(spec)


def test_tiny_configs_are_the_full_ones_cut_down():
    full, tiny = load_config("configs/train_emoji.py"), load_config("configs/train_tiny.py")
    assert set(tiny.keys()) == set(full.keys())
    assert (tiny.sde, tiny.optim.b2, tiny.training.parameterization) == (
        full.sde,
        full.optim.b2,
        full.training.parameterization,
    )
    assert (tiny.model.image_size, tiny.model.nf, tiny.data.source) == (8, 8, "synthetic")
    full, tiny = load_config("configs/eval_emoji.py"), load_config("configs/eval_tiny.py")
    assert set(tiny.keys()) == set(full.keys())
    assert set(tiny.sampler.keys()) == set(full.sampler.keys())
    assert (tiny.sampler.predictor, tiny.max_guides) == ("euler_maruyama", 8)


def test_config_blocks_become_frozen_dataclasses_and_unknown_keys_are_named():
    from sdedit_jax.models import unet
    from sdedit_jax.util.config import frozen

    cfg = frozen(unet.UNetConfig, {"nf": 8, "ch_mult": [1, 2]}, "model")
    assert cfg.ch_mult == (1, 2) and cfg.nf == 8 and hash(cfg)
    assert frozen(unet.UNetConfig, cfg, "model") is cfg
    message = r"^config\.model\.nf_: unknown field, got 8 \(known: image_size"
    with pytest.raises(ValueError, match=message):
        frozen(unet.UNetConfig, {"nf_": 8}, "config.model")


@pytest.mark.parametrize(
    "variant,size,hub",
    [
        ("sd15", 512, "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("sd21_base", 512, "stabilityai/stable-diffusion-2-1-base"),
        ("sd21", 768, "stabilityai/stable-diffusion-2-1"),
    ],
)
def test_sd_variants_name_their_folder_size_and_published_source(variant, size, hub):
    path = os.path.join(REPO, "configs", "sd.py")
    config = load_config(f"{path}:{variant}")
    assert config.model_dir == f"models/{variant}"
    assert tuple(config.input.image_size) == (size, size) and config.input.resize
    assert config.guidance_scale == 7.5 and config.sampler.predictor == "sde_dpm_solver_2m"
    hint = load_module(path).missing_model(f"models/{variant}")
    assert hub in hint and f"--out models/{variant}" in hint
    with pytest.raises(ValueError, match=r"configs/sd.py: variant 'sd3' unknown"):
        load_config(f"{path}:sd3")


@pytest.mark.parametrize(
    "variant,t0,hub",
    [
        ("base", 0.6, "stabilityai/stable-diffusion-xl-base-1.0"),
        ("refiner", 0.3, "stabilityai/stable-diffusion-xl-refiner-1.0"),
    ],
)
def test_sdxl_variants_name_their_folder_t0_and_published_source(variant, t0, hub):
    path = os.path.join(REPO, "configs", "sdxl.py")
    config = load_config(f"{path}:{variant}")
    assert config.model_dir == f"models/sdxl_{variant}" and tuple(config.t0s) == (t0,)
    assert tuple(config.input.image_size) == (1024, 1024) and config.guidance_scale == 5.0
    hint = load_module(path).missing_model(f"models/sdxl_{variant}")
    assert hub in hint and f"--out models/sdxl_{variant}" in hint
