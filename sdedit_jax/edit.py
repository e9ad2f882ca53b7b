"""SDEdit (Meng et al., 2022) as a pure function of per-example keys.

One repeat perturbs the current image to ``t0`` with the forward kernel and
integrates the reverse SDE back to ``eps``. ``repeats = K`` runs K such cycles
in sequence, each starting from the previous output (the paper's Algorithm 1).

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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdedit_jax import rng
from sdedit_jax.sampling.integrate import integrate
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.sde import SDE, Array, ScoreFn


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
) -> Array:
    """Edits a batch of guides; pure and device-agnostic (jit and shard outside).

    Args:
        score_fn: ``score_fn(x[B,H,W,C], t[B]) -> score``, or ``score_fn(x, t, cond)``
            when ``cond`` is given.
        guides: ``[B, H, W, C]`` guide images (the model's value range).
        keys: ``[B]`` per-example keys, derived from (seed, example id).
        t0: ``[B]`` start times in ``(eps, T]``.
        n_steps: ``[B]`` int reverse steps per repeat, in ``[1, sampler.max_steps]``.
        mask: ``[B, H, W, 1 or C]``, 1 = editable; ``None`` edits everything.
        repeats: number of perturb-and-denoise cycles (static).
        cond: per-example conditioning pytree (leading axis ``B``) or ``None``. It is
            bound into the score function here (``score_fn(x, t, cond)`` at every
            evaluation), so the solvers only ever see ``score(x, t)``; the batch axis
            of ``x`` and of ``cond``'s leaves is the same, so each example gets its own.

    Returns:
        ``[B, H, W, C]`` edited images.
    """
    score_fn = _bind(score_fn, cond)
    t_end = jnp.full_like(t0, sde.eps)

    def keep_known(project_keys, x, t):
        known = sde.perturb(project_keys, guides, t)
        return mask * x + (1.0 - mask) * known

    project = None if mask is None else keep_known

    def one_repeat(x, repeat):
        repeat_keys = rng.fold_in(keys, repeat)
        x = sde.perturb(rng.fold_in(repeat_keys, 0), x, t0)
        x = integrate(
            sde, score_fn, sampler, rng.fold_in(repeat_keys, 1), x, t0, t_end, n_steps, project
        )
        if mask is not None:
            x = mask * x + (1.0 - mask) * guides
        return x, None

    out, _ = jax.lax.scan(one_repeat, guides, jnp.arange(repeats))
    return out


def _bind(score_fn: ScoreFn, cond: Any) -> ScoreFn:
    """``score_fn`` itself without conditioning, else ``(x, t) -> score_fn(x, t, cond)``."""
    if cond is None:
        return score_fn
    return lambda x, t: score_fn(x, t, cond)
