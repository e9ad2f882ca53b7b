"""Randomness derived from (seed, example id, repeat, step) alone.

Nothing random may depend on batch size, batch position, padding or device
count, so every draw starts from a per-example key and is refined with
``fold_in``; noise is drawn per example, never for a whole batch at once.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def example_keys(seeds: Array, id_words: Array) -> Array:
    """One key per example: ``fold_in(... fold_in(key(seed), w0) ..., wn)``.

    Args:
        seeds: ``[B]`` integer seeds (usually one job seed repeated).
        id_words: ``[B, W]`` uint32 words of each example's id (``W = 1`` for
            small integer ids; the engine uses two words of an id hash).
    """

    def one(seed, words):
        key = jax.random.key(seed)
        for i in range(words.shape[0]):
            key = jax.random.fold_in(key, words[i])
        return key

    return jax.vmap(one)(seeds, id_words)


def fold_in(keys: Array, data: int | Array) -> Array:
    """``jax.random.fold_in`` applied to each example's key."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def example_noise(keys: Array, like: Array) -> Array:
    """Standard normal noise shaped like ``like[B, ...]``, drawn from each example's key."""
    return jax.vmap(lambda k: jax.random.normal(k, like.shape[1:], like.dtype))(keys)


def ids_to_words(example_ids) -> jnp.ndarray:
    """Normalises integer ids ``[B]`` (or words ``[B, W]``) to uint32 words ``[B, W]``."""
    ids = jnp.asarray(example_ids)
    if ids.ndim == 1:
        ids = ids[:, None]
    return ids.astype(jnp.uint32)


def string_id_words(ids) -> np.ndarray:
    """Two uint32 words per string id (its SHA-256 prefix): the example's noise identity.

    64 bits keep accidental noise sharing between distinct ids negligible
    (~3e-8 for a billion examples); the words depend on the id alone.
    """
    words = np.empty((len(ids), 2), np.uint32)
    for row, example_id in enumerate(ids):
        raw = example_id if isinstance(example_id, bytes) else str(example_id).encode()
        words[row] = np.frombuffer(hashlib.sha256(raw).digest()[:8], np.uint32)
    return words
