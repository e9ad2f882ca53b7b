"""Training data: the in-memory split with batches that are pure functions of (seed, step),
and the tf.data stream for larger sets.

Small splits (``IN_MEMORY_SOURCES``) are held on the devices and step ``k``'s
batch is drawn from epoch-wise permutations keyed by ``k``, so a resumed run
sees exactly the batches of an uninterrupted one (see :mod:`sdedit_jax.train`).
Larger sets (``STREAMING_SOURCES``) stream through
:mod:`sdedit_jax.training.input_pipeline`, skipped to the resume step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdedit_jax.data.images import from_uint8, load_image_folder
from sdedit_jax.training import input_pipeline

Array = jax.Array


def _load_emoji_folder(config: ml_collections.ConfigDict) -> np.ndarray:
    folder = os.path.join(config.path, "train")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"config.data.path={config.path!r}: no train/ folder; build it with "
            "`python -m sdedit_jax.data.emoji --out <path>`"
        )
    images = load_image_folder(folder)
    if images.shape[1:] != (config.image_size, config.image_size, 3):
        raise ValueError(
            f"{folder}: images of shape {images.shape[1:]} do not match "
            f"config.data.image_size={config.image_size} with 3 channels"
        )
    return images


def _synthetic_images(config: ml_collections.ConfigDict, seed: int) -> np.ndarray:
    """Smooth random colour fields: a cheap, learnable data set for tests."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (config.num_examples, 2, 2, config.num_channels))
    factor = config.image_size // 2
    fine = np.repeat(np.repeat(coarse, factor, axis=1), factor, axis=2)
    return fine.astype(np.uint8)


IN_MEMORY_SOURCES = ("emoji", "fashion_mnist", "synthetic")
STREAMING_SOURCES = ("folder", "tfrecord", "tfds")


def load_train_images(config: ml_collections.ConfigDict, seed: int) -> np.ndarray:
    """The whole training split as float32 ``[N, H, W, C]`` in [-1, 1].

    In-memory sources: ``"emoji"`` (folder ``config.path``), ``"fashion_mnist"``
    (first ``config.num_examples`` images, or all when it is None) and
    ``"synthetic"``. Larger data sets stream through tf.data instead
    (:data:`STREAMING_SOURCES`, see :func:`streaming_batches`).
    """
    if config.source == "emoji":
        images = _load_emoji_folder(config)
    elif config.source == "fashion_mnist":
        from sdedit_jax.data import fashion_mnist

        images = fashion_mnist.load_images("train", config.image_size, config.num_channels)
        images = images[: config.num_examples]
    elif config.source == "synthetic":
        images = _synthetic_images(config, seed)
    else:
        raise ValueError(
            f"config.data.source must be one of {IN_MEMORY_SOURCES + STREAMING_SOURCES}, "
            f"got {config.source!r}"
        )
    return from_uint8(images)


def batch_indices(data_key: Array, step: Array, batch_size: int, num_examples: int) -> Array:
    """Dataset indices of step ``step``'s batch: epoch-wise permutations, no repeats
    within an epoch. A batch may straddle two epochs, so both permutations are built."""
    first = step * batch_size
    epoch = first // num_examples
    sample = first + jnp.arange(batch_size)
    perm_now = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
    perm_next = jax.random.permutation(jax.random.fold_in(data_key, epoch + 1), num_examples)
    position = sample % num_examples
    return jnp.where(sample // num_examples == epoch, perm_now[position], perm_next[position])


def make_batch(
    images: Array, data_key: Array, step: Array, batch_size: int, random_flip: bool
) -> Array:
    """Step ``step``'s batch ``[B, H, W, C]``, with optional per-example horizontal flips."""
    order_key, flip_key = jax.random.split(data_key)
    batch = images[batch_indices(order_key, step, batch_size, images.shape[0])]
    if not random_flip:
        return batch
    flip_key = jax.random.fold_in(flip_key, step)
    flip = jax.random.bernoulli(flip_key, 0.5, (batch_size,)).reshape(batch_size, 1, 1, 1)
    return jnp.where(flip, batch[:, :, ::-1, :], batch)


def streaming_batches(
    config: ml_collections.ConfigDict, batch_size: int, seed: int, start_step: int
) -> Iterator[np.ndarray]:
    """Per-host batches from the tf.data pipeline, positioned at ``start_step``.

    The pipeline is deterministic for a seed, so skipping the batches already
    consumed resumes the exact stream (skip still reads them: a cost paid once
    per restart).
    """
    data_config = ml_collections.ConfigDict(
        {k: v for k, v in config.to_dict().items() if k != "num_examples"}
    )
    per_host = batch_size // jax.process_count()
    dataset = input_pipeline.train_dataset(data_config, per_host, seed).skip(start_step)
    return input_pipeline.numpy_batches(dataset)
