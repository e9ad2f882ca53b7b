"""Classifier-free guidance as one batched network call, with a traced per-example scale.

The conditioning of a guided score is ``cond = {"text": h, "guidance": w}`` plus, when
any row guides (``w > 1``), ``"negative": h_negative``. With the negative half, the
network sees ``[x; x]`` against ``[h_negative; h]`` in one call and the score is
``s_u + w (s_c - s_u)``; rows with ``w <= 1`` take ``s_c`` exactly, as diffusers'
``do_classifier_free_guidance = guidance_scale > 1`` does. Guiding scores is guiding the
network's noise or velocity prediction: the score is an affine map of either whose
``x_t`` term is the same in both halves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdedit_jax.sde import ScoreFn


def text_condition(text: Any, negative: Any, guidance: Any) -> dict[str, Any]:
    """The guided score's ``cond``; the negative half only where some row has ``w > 1``.

    Args:
        text, negative: ``[B, L, D]`` text-encoder states of the prompts and negative prompts.
        guidance: ``[B]`` guidance scales (host values: they decide the program's shape).
    """
    w = np.asarray(guidance, np.float32)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"guidance: expected [B] finite scales >= 0, got {w!r}")
    cond = {"text": text, "guidance": w}
    if np.any(w > 1):
        cond["negative"] = negative
    return cond


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuidedScore:
    """``score_fn(x, t, cond)`` of a text-conditional score ``score_fn(x, t, {"text": h})``."""

    conditional: ScoreFn

    def __call__(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        text = cond["text"]
        if "negative" not in cond:
            return self.conditional(x, t, {"text": text})
        pair = self.conditional(
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            {"text": jnp.concatenate([cond["negative"], text])},
        )
        uncond, conditional = jnp.split(pair, 2)
        w = jnp.reshape(cond["guidance"], (-1,) + (1,) * (x.ndim - 1))
        return jnp.where(w > 1, uncond + w * (conditional - uncond), conditional)
