"""SDEdit (Meng et al., 2022) as a pure function of per-example keys.

One repeat perturbs the current image to ``t0`` with the forward kernel and
integrates the reverse SDE back to ``eps``. ``repeats = K`` runs K such cycles
in sequence, each starting from the previous output (the paper's Algorithm 1).
Per-example K (``n_repeats``) is traced within the static bucket ``repeats`` (as
``n_steps`` is within ``max_steps``): an example keeps its output after its own K
cycles, and cycle ``k`` draws from ``fold_in(key, k)`` whatever the bucket, so its
output does not depend on the bucket or on its batch mates.

Masked editing (mask = 1 marks the editable region, as in the paper): after
every step, pixels outside the mask are replaced by the original perturbed to
the current time with fresh noise, and the final output equals the original
exactly outside the mask. Compositing is masked editing of a pasted composite.
The reset applies to every solver, multistep ones included: their history
(the network's previous data prediction) is kept as the network produced it
at the projected state; as the updates are elementwise, its known pixels
only reach known pixels, which the reset overwrites (see
:mod:`sdedit_jax.sampling.dpm_solver`).

Step count versus the paper: the paper discretises [0, 1] into ``N`` steps and
starts at ``t0``, i.e. runs ``N * t0`` steps (N=500, t0=0.5 -> 250). Here each
example takes ``n_steps`` steps (on the sampler's time grid) from its own ``t0`` down to ``eps``;
``n_steps`` is a per-example traced value (like ``t0``), so the paper's rule
``n_steps = ceil(N * t0)`` can differ across a batch inside one compiled
program. Only ``Sampler.max_steps``, the bucket bounding ``n_steps``, is static.

Latent models: a ``codec`` (:class:`Codec`; the VAE of a latent model) maps guides
to the space the SDE runs in and back, inside the same program. The mask is mapped by
the codec too (``codec.latent_mask``), the edit runs on latents, and the decoded image
is pasted back in pixel space, so pixels outside the mask equal the guide exactly.
Without a codec the SDE runs on the pixels themselves.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from sdedit_jax import rng
from sdedit_jax.sampling.integrate import integrate
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.sde import SDE, Array, ScoreFn

# The codec's draws (a VAE posterior sample) come from fold_in(key, CODEC_STREAM); the
# repeats use fold_in(key, 0 .. repeats - 1), so the two never share a key.
CODEC_STREAM = 0x7FFFFFFF
PROJECTION_NOISES = ("fresh", "initial")


class Codec(Protocol):
    """Maps images to the space the SDE runs in and back (a latent model's autoencoder).

    A pytree: its array leaves (weights) are traced, the rest is static and hashable.
    """

    def encode(self, keys: Array, x: Array) -> Array:
        """``[B, H, W, C]`` images in [-1, 1] to ``[B, h, w, c]``; ``keys[B]`` for sampling."""
        ...

    def decode(self, z: Array) -> Array:
        """``[B, h, w, c]`` back to ``[B, H, W, C]`` images."""
        ...

    def latent_mask(self, mask: Array) -> Array:
        """A pixel mask ``[B, H, W, 1 or C]`` (1 = editable) as ``[B, h, w, 1]``."""
        ...


def check_projection_noise(projection_noise: str) -> None:
    if projection_noise not in PROJECTION_NOISES:
        raise ValueError(
            f"projection_noise: must be one of {PROJECTION_NOISES}, got {projection_noise!r}"
        )


def sdedit_batch(
    score_fn: ScoreFn,
    sde: SDE,
    sampler: Sampler,
    guides: Array,
    keys: Array,
    t0: Array,
    n_steps: Array,
    mask: Array | None = None,
    repeats: int = 1,
    cond: Any = None,
    codec: Codec | None = None,
    initial_noise: Array | None = None,
    projection_noise: str = "fresh",
    n_repeats: Array | None = None,
) -> Array:
    """Edits a batch of guides; pure and device-agnostic (jit and shard outside).

    Args:
        score_fn: ``score_fn(x[B,H,W,C], t[B]) -> score``, or ``score_fn(x, t, cond)``
            when ``cond`` is given; ``x`` is in the codec's space when there is one.
        guides: ``[B, H, W, C]`` guide images (the model's value range).
        keys: ``[B]`` per-example keys, derived from (seed, example id).
        t0: ``[B]`` start times in ``(eps, T]``.
        n_steps: ``[B]`` int reverse steps per repeat, in ``[1, sampler.max_steps]``.
        mask: ``[B, H, W, 1 or C]``, 1 = editable; ``None`` edits everything.
        repeats: number of perturb-and-denoise cycles (static); with ``n_repeats``, the
            bucket bounding them.
        cond: per-example conditioning pytree (leading axis ``B``) or ``None``. It is
            bound into the score function here (``score_fn(x, t, cond)`` at every
            evaluation), so the solvers only ever see ``score(x, t)``; the batch axis
            of ``x`` and of ``cond``'s leaves is the same, so each example gets its own.
        codec: the latent model's autoencoder (:class:`Codec`), or ``None`` to edit pixels.
        initial_noise: the noise of the first repeat's perturbation to ``t0``, shaped like
            the encoded guides; ``None`` draws it from the example's key. Lets a test start
            two implementations from the same noised state.
        projection_noise: the noise of a masked edit's known region at each step:
            ``"fresh"`` draws it anew (the paper's Algorithm); ``"initial"`` re-uses the
            repeat's perturbation noise (the official SDEdit code's and diffusers'
            ``StableDiffusionInpaintPipeline``'s convention).
        n_repeats: ``[B]`` int cycles per example, in ``[1, repeats]`` (traced); ``None``:
            ``repeats`` for every example.

    Returns:
        ``[B, H, W, C]`` edited images.
    """
    check_projection_noise(projection_noise)
    score_fn = _bind(score_fn, cond)
    t_end = jnp.full_like(t0, sde.eps)
    if codec is None:
        x0, edit_mask = guides, mask
    else:
        x0 = codec.encode(rng.fold_in(keys, CODEC_STREAM), guides)
        edit_mask = None if mask is None else codec.latent_mask(mask)

    def one_repeat(x, repeat):
        edited = _one_cycle(x, repeat)
        if n_repeats is None:
            return edited, None
        active = (repeat < n_repeats).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(active, edited, x), None

    def _one_cycle(x, repeat):
        repeat_keys = rng.fold_in(keys, repeat)
        noise = rng.example_noise(rng.fold_in(repeat_keys, 0), x)
        if initial_noise is not None:
            noise = jnp.where(repeat == 0, initial_noise.astype(x.dtype), noise)
        mean, std = sde.marginal(x, t0)
        x = mean + std * noise

        def keep_known(project_keys, x, t):
            if projection_noise == "initial":
                known_mean, known_std = sde.marginal(x0, t)
                known = known_mean + known_std * noise
            else:
                known = sde.perturb(project_keys, x0, t)
            return edit_mask * x + (1.0 - edit_mask) * known

        project = None if edit_mask is None else keep_known
        x = integrate(
            sde, score_fn, sampler, rng.fold_in(repeat_keys, 1), x, t0, t_end, n_steps, project
        )
        if edit_mask is not None:
            x = edit_mask * x + (1.0 - edit_mask) * x0
        return x

    out, _ = jax.lax.scan(one_repeat, x0, jnp.arange(repeats))
    if codec is None:
        return out
    out = codec.decode(out)
    return out if mask is None else mask * out + (1.0 - mask) * guides


def _bind(score_fn: ScoreFn, cond: Any) -> ScoreFn:
    """``score_fn`` itself without conditioning, else ``(x, t) -> score_fn(x, t, cond)``."""
    if cond is None:
        return score_fn
    return lambda x, t: score_fn(x, t, cond)
