"""The edit's latent seam: a codec around the SDE, the initial noise, the projection noise.

Truth: the composition the seam promises (encode, the pixel engine on latents, decode,
paste back) computed outside the program, closed-form flows of Gaussian data, and the
seed-independence that re-using the initial noise implies.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax.tools.gaussian_reference import GaussianScore, flow_map

MU, S = 0.3, 0.5
FACTOR = 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PoolCodec:
    """A linear stand-in for a VAE: 2x2 average pooling times a gain (a traced weight)."""

    gain: jax.Array
    factor: int = dataclasses.field(default=FACTOR, metadata={"static": True})

    def encode(self, keys, x):
        del keys
        b, h, w, c = x.shape
        pooled = x.reshape(b, h // FACTOR, FACTOR, w // FACTOR, FACTOR, c).mean(axis=(2, 4))
        return self.gain * pooled

    def decode(self, z):
        up = jnp.repeat(jnp.repeat(z, FACTOR, axis=1), FACTOR, axis=2)
        return up / self.gain

    def latent_mask(self, mask):
        b, h, w, _ = mask.shape
        pooled = mask.max(axis=-1).reshape(b, h // FACTOR, FACTOR, w // FACTOR, FACTOR)
        return pooled.max(axis=(2, 4))[..., None]


def _inputs(batch=4, side=8, seed=0):
    rng = np.random.default_rng(seed)
    guides = rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)
    mask = np.zeros((batch, side, side, 1), np.float32)
    mask[:, 2:5, 1:6] = 1.0  # straddles latent cells: max-pooling widens it to whole cells
    t0 = np.linspace(0.3, 0.8, batch).astype(np.float32)
    return guides, mask, t0


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("predictor", ["euler_maruyama", "dpm_solver_2m"])
def test_a_codec_edit_is_encode_then_the_latent_edit_then_decode_and_paste(predictor, masked):
    sde = sj.VPSDE()
    codec = PoolCodec(jnp.asarray(1.5))
    guides, mask, t0 = _inputs()
    mask = mask if masked else None
    noise = np.random.default_rng(1).normal(size=(4, 4, 4, 3)).astype(np.float32)
    score = GaussianScore(sde, MU, S)
    common = dict(seed=3, t0=t0, n_steps=12, predictor=predictor, initial_noise=noise)
    out = np.asarray(sj.sdedit(score, sde, guides, codec=codec, mask=mask, **common))

    latents = np.asarray(codec.encode(None, jnp.asarray(guides)))
    latent_mask = None if mask is None else np.asarray(codec.latent_mask(jnp.asarray(mask)))
    edited = sj.sdedit(score, sde, latents, mask=latent_mask, **common)
    expected = np.asarray(codec.decode(edited))
    if masked:
        expected = mask * expected + (1 - mask) * guides
        np.testing.assert_array_equal(out[mask[..., 0] == 0], guides[mask[..., 0] == 0])
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


def test_the_initial_noise_is_the_perturbation_to_t0():
    """DDIM (eta 0) with the exact score of Gaussian data is the probability-flow map of
    the perturbed guide ``m(t0) g + s(t0) z``, for the given ``z`` (up to the solver's
    error, 1.3e-3 at 64 steps and second order; another ``z`` would be off by O(s(t0)))."""
    sde = sj.VPSDE()
    guides, _, t0 = _inputs()
    z = np.random.default_rng(2).normal(size=guides.shape).astype(np.float32)
    out = sj.sdedit(
        GaussianScore(sde, MU, S), sde, guides, t0=t0, n_steps=64, predictor="dpm_solver_2m",
        initial_noise=z, denoise=False,
    )  # fmt: skip
    for b in range(len(t0)):
        mean, std = (
            np.asarray(v) for v in sde.marginal(jnp.asarray(guides[b : b + 1]), t0[b : b + 1])
        )
        x_t0 = mean + std * z[b : b + 1]
        expected = flow_map(sde, MU, S, x_t0, float(t0[b]), sde.eps)
        np.testing.assert_allclose(np.asarray(out[b : b + 1]), expected, atol=3e-3)


@dataclasses.dataclass(frozen=True)
class CoupledScore:
    """A Gaussian score plus a pull towards the left neighbour: editable pixels see known ones."""

    gaussian: GaussianScore

    def __call__(self, x, t):
        return self.gaussian(x, t) + 0.5 * (jnp.roll(x, 1, axis=2) - x)


@pytest.mark.parametrize("codec", [None, PoolCodec(jnp.asarray(1.0))], ids=["pixels", "latents"])
def test_initial_projection_noise_makes_a_deterministic_masked_edit_seed_free(codec):
    """With zero initial noise and DDIM, ``"initial"`` projects the known region onto its
    noise-free mean at every step, so no draw is left: two seeds agree. ``"fresh"`` draws
    the known region's noise from the seed, which the coupled score carries inside."""
    sde = sj.VPSDE()
    guides, mask, t0 = _inputs()
    latent_shape = guides.shape if codec is None else (4, 4, 4, 3)
    score = CoupledScore(GaussianScore(sde, MU, S))

    def edit(seed, projection_noise):
        return np.asarray(
            sj.sdedit(
                score, sde, guides, seed=seed, t0=t0, mask=mask, n_steps=8, predictor="ddim",
                codec=codec, initial_noise=np.zeros(latent_shape, np.float32),
                projection_noise=projection_noise,
            )
        )  # fmt: skip

    np.testing.assert_array_equal(edit(0, "initial"), edit(1, "initial"))
    assert np.abs(edit(0, "fresh") - edit(1, "fresh")).max() > 1e-3
    outside = mask[..., 0] == 0
    np.testing.assert_array_equal(edit(0, "initial")[outside], guides[outside])


def test_bad_initial_noise_and_projection_noise_are_named():
    sde = sj.VPSDE()
    guides, _, _ = _inputs()
    score = GaussianScore(sde, MU, S)
    with pytest.raises(
        ValueError, match=r"initial_noise: shape \(4, 8, 8, 3\), expected \(4, 4, 4, 3\)"
    ):
        sj.sdedit(score, sde, guides, codec=PoolCodec(jnp.asarray(1.0)), initial_noise=guides)
    with pytest.raises(ValueError, match="initial_noise: non-finite"):
        sj.sdedit(score, sde, guides, initial_noise=np.full_like(guides, np.nan))
    with pytest.raises(ValueError, match="projection_noise: must be one of"):
        sj.sdedit(score, sde, guides, projection_noise="old")


def test_a_new_codec_weight_reuses_the_program():
    sde = sj.VPSDE()
    guides, _, t0 = _inputs()
    score = GaussianScore(sde, MU, S)
    before = sj.engine.compiled_program_count()
    for gain in (1.0, 2.0):
        sj.sdedit(score, sde, guides, t0=t0, n_steps=4, codec=PoolCodec(jnp.asarray(gain)))
    assert sj.engine.compiled_program_count() == before + 1
