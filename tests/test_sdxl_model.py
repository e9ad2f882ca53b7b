"""SDXL base and refiner against diffusers' StableDiffusionXLImg2ImgPipeline: the public
contract (both tokenizers, the text states and pooled projection, time ids, the U-Net
with its added conditioning) and whole img2img edits from the same noised latent."""

import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax import convert

torch = pytest.importorskip("torch", reason="the reference pipeline needs torch")
diffusers = pytest.importorskip("diffusers", reason="the reference pipeline needs diffusers")
pytest.importorskip("transformers", reason="the reference text encoders need transformers")

from sdedit_jax.latent import guidance  # noqa: E402
from tests import sd_reference  # noqa: E402
from tests.test_sd_img2img import DDIM, NOISE_SEED, _nchw, _noise  # noqa: E402

PROMPTS = ["a red barn in the snow", "an astronaut riding a horse, " * 12]  # one cut at 77
TOL = 1e-4


@pytest.fixture(scope="module", params=["base", "refiner"])
def folder(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"sdxl_{request.param}"))
    sd_reference.save_xl_pipeline(path, refiner=request.param == "refiner")
    return path


def _pipeline(folder):
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **DDIM)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_contract_matches_the_pipeline(folder):
    model = sj.load_model(folder)
    pipe = _pipeline(folder)
    refiner = pipe.text_encoder is None
    ids = model.tokenize(PROMPTS)
    assert sorted(ids) == (["text_encoder_2"] if refiner else ["text_encoder", "text_encoder_2"])
    for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        if tokenizer is not None:
            expected = tokenizer(
                PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np"
            ).input_ids
            np.testing.assert_array_equal(ids[name], expected)
    assert list(model.tokenize_with_flags(PROMPTS)[1]) == [False, True]
    h, pooled = model.encode_text(ids)
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert sd_reference.rel_err(h, embeds[0].numpy()) <= TOL
    assert sd_reference.rel_err(pooled, embeds[2].numpy()) <= TOL

    sizes, crops, targets = ((64, 48), (32, 32)), ((0, 8), (4, 0)), ((64, 64), (32, 48))
    time_ids = model.time_ids(sizes, crops, targets, aesthetic_score=(6.0, 3.5))
    for row, (size, crop, target, score) in enumerate(
        zip(sizes, crops, targets, (6.0, 3.5), strict=True)
    ):
        expected, _ = pipe._get_add_time_ids(
            size, crop, target, score, 2.5, size, crop, target, torch.float32,
            text_encoder_projection_dim=pooled.shape[1],
        )  # fmt: skip
        np.testing.assert_array_equal(time_ids[row], expected.numpy()[0])
    assert time_ids.shape[1] == (5 if refiner else 6)

    z = np.random.default_rng(4).standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([801.0, 20.0], np.float32)
    added = {"text_embeds": np.asarray(pooled), "time_ids": time_ids}
    found = sj.load_network(folder)(z, t, np.asarray(h), added_cond=added)
    with torch.no_grad():
        expected = pipe.unet(
            _nchw(z), torch.from_numpy(t), torch.from_numpy(np.asarray(h)),
            added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()},
        ).sample  # fmt: skip
    assert sd_reference.rel_err(found, expected.numpy().transpose(0, 2, 3, 1)) <= TOL


def _condition(model, w, side):
    """The guided cond as the pipeline builds it: its default negative prompt (None) is
    zeros where ``force_zeros_for_empty_prompt``, else the encoded empty prompt."""
    h, pooled = model.encode_text(model.tokenize(PROMPTS))
    if model.force_zeros_for_empty_prompt:
        nh, npooled = np.zeros_like(h), np.zeros_like(pooled)
    else:
        nh, npooled = model.encode_text(model.tokenize([""] * len(PROMPTS)))
    ids = model.time_ids((side, side), (0, 0), aesthetic_score=6.0)
    negative_ids = model.time_ids((side, side), (0, 0), aesthetic_score=2.5)
    batch = len(PROMPTS)
    positive = model.condition(h, pooled, np.repeat(ids, batch, 0))
    negative = model.condition(nh, npooled, np.repeat(negative_ids, batch, 0))
    return guidance.text_condition(positive, negative, np.full(batch, w, np.float32))


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_img2img_matches_the_pipeline(folder, strength):
    steps, w = 10, 5.0
    model = sj.load_model(folder)
    side = model.image_size
    guides = np.random.default_rng(0).uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    latents = np.asarray(model.encode(guides))
    pipe = _pipeline(folder)
    with torch.no_grad():
        expected = pipe(
            prompt=PROMPTS, image=_nchw(latents), strength=strength, num_inference_steps=steps,
            guidance_scale=w, eta=0.0, generator=torch.Generator().manual_seed(NOISE_SEED),
            output_type="np",
        ).images  # fmt: skip
    out = sj.sdedit(
        model.score_fn, model.sde, guides, t0=strength, n_steps=int(steps * strength),
        max_steps=8, predictor="ddim", time_grid="uniform", cond=_condition(model, w, side),
        codec=model.codec, initial_noise=_noise(latents.shape),
    )  # fmt: skip
    found = np.clip(np.asarray(out) / 2 + 0.5, 0, 1)
    err = np.abs(found - expected).max()
    print(f"{folder.rsplit('/', 1)[-1]} strength {strength}: max abs err {err:.2e}")
    assert err <= 1e-3


def test_a_converted_folder_is_the_same_model(folder, tmp_path):
    out = str(tmp_path / "converted")
    info = convert.convert(folder, out)
    assert info["latent"]["kind"] == "sdxl"
    model, converted = sj.load_model(folder), sj.load_model(out)
    assert converted.description == model.description
    assert converted.checksum == model.checksum
    assert converted.requires_aesthetics_score == model.requires_aesthetics_score
    ids = model.tokenize(PROMPTS)
    for a, b in zip(model.encode_text(ids), converted.encode_text(ids), strict=True):
        np.testing.assert_array_equal(a, b)
    z = np.random.default_rng(5).standard_normal((2, 16, 16, 4)).astype(np.float32)
    h, pooled = model.encode_text(ids)
    added = {"text_embeds": np.asarray(pooled), "time_ids": model.time_ids([(32, 32)] * 2)}
    np.testing.assert_array_equal(
        sj.load_network(folder)(z, 500.0, np.asarray(h), added_cond=added),
        sj.load_network(out)(z, 500.0, np.asarray(h), added_cond=added),
    )
    # A changed tokenizer file is named, never loaded.
    vocab = tmp_path / "converted" / "tokenizer_2" / "tokenizer.json"
    vocab.write_text(vocab.read_text(encoding="utf-8") + " ", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_2: files differ from the sha256"):
        sj.load_model(out)
