"""Classifier-free guidance as one batched network call, with a traced per-example scale.

The conditioning of a guided score is the conditional network's own ``cond`` (SD:
``{"text": h}``; SDXL adds ``text_embeds`` and ``time_ids``) plus ``"guidance": w`` and,
when any row guides (``w > 1``), ``"negative"``: the same keys for the negative prompts.
With the negative half, the network sees ``[x; x]`` against ``[negative; positive]`` in
one call and the score is ``s_u + w (s_c - s_u)``; rows with ``w <= 1`` take ``s_c``
exactly, as diffusers' ``do_classifier_free_guidance = guidance_scale > 1`` does.
Guiding scores is guiding the network's noise or velocity prediction: the score is an
affine map of either whose ``x_t`` term is the same in both halves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdedit_jax.sde import ScoreFn

GUIDANCE_KEYS = ("guidance", "negative")


def _network_cond(value: Any, name: str) -> dict[str, Any]:
    """A conditional network's ``cond``: a mapping, or bare text states (``{"text": h}``)."""
    cond = dict(value) if isinstance(value, Mapping) else {"text": value}
    reserved = sorted(set(cond) & set(GUIDANCE_KEYS))
    if reserved:
        raise ValueError(f"{name}: {reserved[0]!r} is the guided score's own key")
    return cond


def text_condition(text: Any, negative: Any, guidance: Any) -> dict[str, Any]:
    """The guided score's ``cond``; the negative half only where some row has ``w > 1``.

    Args:
        text, negative: the conditional network's ``cond`` for the prompts and for the
            negative prompts: ``[B, L, D]`` text-encoder states, or a mapping of
            ``[B, ...]`` arrays with the same keys in both (SDXL's).
        guidance: ``[B]`` guidance scales (host values: they decide the program's shape).
    """
    w = np.asarray(guidance, np.float32)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"guidance: expected [B] finite scales >= 0, got {w!r}")
    positive = _network_cond(text, "text")
    cond = {**positive, "guidance": w}
    if np.any(w > 1):
        negative = _network_cond(negative, "negative")
        if set(negative) != set(positive):
            raise ValueError(
                f"negative: keys {sorted(negative)}, the prompts' cond has {sorted(positive)}"
            )
        cond["negative"] = negative
    return cond


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuidedScore:
    """``score_fn(x, t, cond)`` of a text-conditional score ``score_fn(x, t, {"text": h})``."""

    conditional: ScoreFn

    def __call__(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        positive = {k: v for k, v in cond.items() if k not in GUIDANCE_KEYS}
        if "negative" not in cond:
            return self.conditional(x, t, positive)
        both = jax.tree.map(lambda n, p: jnp.concatenate([n, p]), cond["negative"], positive)
        pair = self.conditional(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        uncond, conditional = jnp.split(pair, 2)
        w = jnp.reshape(cond["guidance"], (-1,) + (1,) * (x.ndim - 1))
        return jnp.where(w > 1, uncond + w * (conditional - uncond), conditional)
