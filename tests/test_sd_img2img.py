"""Stable Diffusion editing end to end against diffusers' own img2img and inpainting pipelines.

Truth: ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` (4-channel
UNet) on tiny random components saved by diffusers/transformers, with DDIM on trailing
timesteps (``steps_offset=0``, ``set_alpha_to_one=True``, eta 0). Both sides start from the
same noised latent: the pipelines take the latents of the guide as ``image`` and draw their
noise from a torch generator of a known seed, which sdedit_jax gets as ``initial_noise``.
This pins the mapping: ``t0 = strength``, ``n_steps = int(num_inference_steps * strength)``.
"""

import numpy as np
import pytest

import sdedit_jax as sj

torch = pytest.importorskip("torch", reason="the reference pipelines need torch")
diffusers = pytest.importorskip("diffusers", reason="the reference pipelines need diffusers")
pytest.importorskip("transformers", reason="the reference text encoder needs transformers")

from sdedit_jax.latent import guidance  # noqa: E402
from tests import sd_reference  # noqa: E402

PROMPTS = ["a red barn in the snow", "an astronaut riding a horse, oil painting"]
DDIM = dict(timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0, clip_sample=False)
NOISE_SEED = 7


@pytest.fixture(scope="module", params=[("sd1", "epsilon"), ("sd2", "v_prediction")])
def folder(request, tmp_path_factory):
    version, prediction_type = request.param
    path = str(tmp_path_factory.mktemp(f"{version}_{prediction_type}"))
    sd_reference.save_pipeline(path, version=version, prediction_type=prediction_type)
    return path


def _guides(model, batch=2, seed=0):
    side = model.image_size
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)
    return x


def _noise(shape_nhwc):
    """The noise diffusers' pipelines draw first from ``Generator().manual_seed(NOISE_SEED)``."""
    b, h, w, c = shape_nhwc
    generator = torch.Generator().manual_seed(NOISE_SEED)
    noise = torch.randn((b, c, h, w), generator=generator, dtype=torch.float32)
    return noise.numpy().transpose(0, 2, 3, 1)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _pipeline(cls, folder):
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **DDIM)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _condition(model, w):
    text = model.encode_text(model.tokenize(PROMPTS))
    negative = model.encode_text(model.tokenize([""] * len(PROMPTS)))
    return guidance.text_condition(text, negative, np.full(len(PROMPTS), w, np.float32))


@pytest.mark.parametrize("steps", [5, 10, 20])  # one compiled program: max_steps=16 for all
def test_img2img_matches_diffusers_with_trailing_ddim(folder, steps):
    strength, w = 0.6, 7.5
    model = sj.load_model(folder)
    guides = _guides(model)
    latents = np.asarray(model.encode(guides))
    noise = _noise(latents.shape)
    pipe = _pipeline(diffusers.StableDiffusionImg2ImgPipeline, folder)
    with torch.no_grad():
        expected = pipe(
            prompt=PROMPTS, image=_nchw(latents), strength=strength, num_inference_steps=steps,
            guidance_scale=w, eta=0.0, generator=torch.Generator().manual_seed(NOISE_SEED),
            output_type="np",
        ).images  # fmt: skip
    out = sj.sdedit(
        model.score_fn, model.sde, guides, t0=strength, n_steps=int(steps * strength),
        max_steps=16, predictor="ddim", time_grid="uniform", cond=_condition(model, w),
        codec=model.codec, initial_noise=noise,
    )  # fmt: skip
    found = np.clip(np.asarray(out) / 2 + 0.5, 0, 1)
    err = np.abs(found - expected).max()
    print(f"{folder.rsplit('/', 1)[-1]} {steps} steps: max abs err {err:.2e}")
    assert err <= 1e-3


def test_masked_latents_match_diffusers_inpainting_and_pixels_outside_stay(folder):
    """Re-using the initial noise for the known region (``projection_noise="initial"``) and
    nearest mask downsampling is diffusers' 4-channel inpainting: the same latents. The
    output then pastes the guide back: exact outside the mask."""
    if "v_prediction" in folder:
        pytest.skip("one parameterisation suffices for the masked loop")
    strength, w, steps = 0.75, 7.5, 8
    model = sj.load_model(folder)
    guides = _guides(model, seed=1)
    side = model.image_size
    mask = np.zeros((2, side, side, 1), np.float32)
    mask[0, 4:20, 6:26] = 1.0
    mask[1, 10:30, 2:12] = 1.0
    codec = model.codec_with(mask_downsample="nearest")
    latents = np.asarray(model.encode(guides))
    noise = _noise(latents.shape)
    pipe = _pipeline(diffusers.StableDiffusionInpaintPipeline, folder)
    with torch.no_grad():
        expected = pipe(
            prompt=PROMPTS, image=_nchw(latents), mask_image=_nchw(mask),
            masked_image_latents=_nchw(latents), height=side, width=side, strength=strength,
            num_inference_steps=steps, guidance_scale=w, eta=0.0,
            generator=torch.Generator().manual_seed(NOISE_SEED), output_type="latent",
        ).images  # fmt: skip
    expected = expected.numpy().transpose(0, 2, 3, 1)
    common = dict(
        t0=strength, n_steps=int(steps * strength), predictor="ddim", time_grid="uniform",
        cond=_condition(model, w), initial_noise=noise, projection_noise="initial",
    )  # fmt: skip
    latent_mask = np.asarray(codec.latent_mask(mask))
    found = sj.sdedit(model.score_fn, model.sde, latents, mask=latent_mask, **common)
    err = sd_reference.rel_err(found, expected)
    print(f"inpainting latents: max rel err {err:.2e}")
    assert err <= 1e-3

    out = np.asarray(sj.sdedit(model.score_fn, model.sde, guides, mask=mask, codec=codec, **common))
    outside = mask[..., 0] == 0
    np.testing.assert_array_equal(out[outside], guides[outside])
    decoded = np.asarray(model.decode(expected))
    inside = ~outside
    assert np.abs(out[inside] - decoded[inside]).max() <= 2e-3
