"""A FeatureExtractor over any classifier network with ``features`` and a head.

The network's graph is static and its weights are traced, so one jitted
program serves every batch of a given shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def check_images(images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] RGB in [0, 1], got shape {images.shape}")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(
    graphdef: nnx.GraphDef, preprocess: Callable, head: str, state: nnx.State, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state)
    features = model.features(preprocess(images.astype(jnp.float32)))
    return features, getattr(model, head)(features)


class NetworkFeatures:
    """``__call__(images [B,H,W,3] in [0,1]) -> [B, dim]`` features, ``logits`` for checks.

    Args:
        model: an NNX module with ``features(x)`` and a classifier attribute ``head``.
        preprocess: maps ``[0, 1]`` images to the network's input (resize, scale);
            a module-level function, so it is hashable and static under jit.
        head: name of the classifier layer applied to the features.
    """

    name: str
    dim: int

    def __init__(self, model: nnx.Module, preprocess: Callable, head: str):
        self._graphdef, self._state = nnx.split(model)
        self._preprocess, self._head = preprocess, head

    def _run(self, images) -> tuple[jax.Array, jax.Array]:
        images = jnp.asarray(images)
        check_images(images)
        return _apply(self._graphdef, self._preprocess, self._head, self._state, images)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self._run(images)[0]

    def logits(self, images: jax.Array) -> jax.Array:
        return self._run(images)[1]
