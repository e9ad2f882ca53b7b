"""Deterministic tf.data training input for the score model.

`train_dataset` yields an infinite stream of `{"image": float32 [B, H, W, C]}`
batches. Pixel values lie in [-1, 1] by default (`value_range="-1_1"`, the range
the SDEs and the score model assume) or in [0, 1] (`value_range="0_1"`).

Determinism: every random choice is a stateless op keyed by the seed, the
process index and a counter (epoch, window or example index), never by TF's
global seed, and tf.data runs with `deterministic=True`; so the same seed gives
the same batches on every run.

Shuffling: sources with random access (image folders, Fashion-MNIST) get a full
permutation per epoch. Streaming sources (TFRecord, TFDS) shuffle the file order
per epoch (TFRecord only) and then permute consecutive windows of
`shuffle_window` examples; their shuffle is only as good as that window.

Data config fields (see `default_config`):
  source: "folder" | "tfrecord" | "tfds" | "emoji" | "fashion_mnist".
  path: image folder ("folder"), file glob ("tfrecord") or build folder ("emoji").
  name, data_dir: TFDS builder name and data directory (data_dir also overrides
    the Fashion-MNIST directory).
  split: "train"/"test" for emoji and Fashion-MNIST, any TFDS split string.
  image_key: TFDS feature that holds the image.
  image_size: output side; larger or non-square images are centre-cropped and
    resized with an antialiased bilinear filter.
  num_channels: 1 or 3.
  value_range: "-1_1" or "0_1".
  random_flip: random horizontal flips with probability 1/2.
  shuffle_window: window size of the streaming shuffle.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sdedit_jax.data import emoji, fashion_mnist, images
from sdedit_jax.util.config import frozen

SOURCES = ("folder", "tfrecord", "tfds", "emoji", "fashion_mnist")
VALUE_RANGES = ("-1_1", "0_1")
_AUTOTUNE = tf.data.AUTOTUNE
# Independent random streams derived from one seed.
_STREAM_EXAMPLE_ORDER = 0
_STREAM_FILE_ORDER = 1
_STREAM_FLIP = 2


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Validated data config; field meanings are in the module docstring."""

    source: str = "emoji"
    path: str = ""
    name: str = ""
    data_dir: str = ""
    split: str = "train"
    image_key: str = "image"
    image_size: int = 32
    num_channels: int = 3
    value_range: str = "-1_1"
    random_flip: bool = True
    shuffle_window: int = 1024


def default_config() -> ml_collections.ConfigDict:
    """A data config with every field at its default, to copy and edit."""
    return ml_collections.ConfigDict(dataclasses.asdict(DataSettings()))


def parse_config(config: ml_collections.ConfigDict) -> DataSettings:
    """Fills defaults and rejects unknown or invalid fields, naming them."""
    settings = frozen(DataSettings, config, "config.data")
    checks = {
        "source": settings.source in SOURCES,
        "value_range": settings.value_range in VALUE_RANGES,
        "image_size": settings.image_size > 0,
        "num_channels": settings.num_channels in (1, 3),
        "shuffle_window": settings.shuffle_window > 0,
        "path": bool(settings.path) or settings.source in ("tfds", "fashion_mnist"),
        "name": bool(settings.name) or settings.source != "tfds",
    }
    for field, ok in checks.items():
        if not ok:
            raise ValueError(
                f"Invalid data config field {field}={getattr(settings, field)!r} "
                f"for source {settings.source!r} (sources: {SOURCES}, value ranges: "
                f"{VALUE_RANGES}, num_channels: 1 or 3)."
            )
    return settings


def _fold_in(key: tf.Tensor, data: tf.Tensor | int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _stream_key(seed: int, stream: int, process_index: int = 0) -> tf.Tensor:
    """Seed [2] for one random stream; folding in the process decorrelates hosts."""
    base = tf.constant([seed, process_index], dtype=tf.int64)
    return _fold_in(base, stream)


def _permuted_position(position: tf.Tensor, count: int, key: tf.Tensor) -> tf.Tensor:
    """Where `position` of [0, count) lands in the permutation keyed by `key`."""
    return tf.random.experimental.index_shuffle(position, key, tf.constant(count - 1, tf.int64))


def _shard(items: list, process_index: int, process_count: int, what: str) -> list:
    if len(items) < process_count:
        raise ValueError(f"{what} has {len(items)} items, fewer than {process_count} processes.")
    return items[process_index::process_count]


def _is_supported_image(encoded: tf.Tensor) -> tf.Tensor:
    head = tf.strings.substr(encoded, 0, 4)
    return tf.reduce_any(
        tf.stack(
            [
                tf.equal(head, b"\x89PNG"),
                tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"),
            ]
        )
    )


def _decode(encoded: tf.Tensor, origin: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes PNG/JPEG bytes to uint8 [H, W, channels]; `origin` names the source in errors."""
    check = tf.debugging.Assert(
        _is_supported_image(encoded), ["Not a PNG or JPEG image:", origin], summarize=1
    )
    with tf.control_dependencies([check]):
        return tf.io.decode_image(encoded, channels=channels, expand_animations=False)


def _match_channels(image: tf.Tensor, channels: int, origin: str) -> tf.Tensor:
    """Converts an already decoded image between grey, RGB and RGBA (alpha is dropped)."""
    have = image.shape[-1]
    if have == 4:
        image, have = image[..., :3], 3
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return tf.tile(image, [1, 1, 3])
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(f"{origin}: cannot convert images with {have} channels to {channels}.")


def _fit(image: tf.Tensor, size: int) -> tf.Tensor:
    """Centre-crops uint8 [H, W, C] to a square and resizes it to `size` only if needed."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    square = tf.image.crop_to_bounding_box(
        image, (height - side) // 2, (width - side) // 2, side, side
    )

    def resize() -> tf.Tensor:
        resized = tf.image.resize(square, [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    fitted = tf.cond(tf.equal(side, size), lambda: square, resize)
    return tf.ensure_shape(fitted, [size, size, image.shape[-1]])


def _random_access(
    count: int, load: Callable[[tf.Tensor], tf.Tensor], key: tf.Tensor
) -> tf.data.Dataset:
    """Infinite stream of `load(i)` visiting a fresh permutation of [0, count) each epoch."""

    def load_step(step: tf.Tensor) -> tf.Tensor:
        epoch_key = _fold_in(key, step // count)
        return load(_permuted_position(step % count, count, epoch_key))

    return tf.data.Dataset.counter().map(load_step, num_parallel_calls=_AUTOTUNE)


def _window_shuffle(ds: tf.data.Dataset, window: int, key: tf.Tensor) -> tf.data.Dataset:
    """Permutes each run of `window` consecutive elements of an infinite stream."""

    def permute(window_index: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
        positions = tf.range(window, dtype=tf.int64)
        order = _permuted_position(positions, window, _fold_in(key, window_index))
        return tf.gather(batch, order)

    return ds.batch(window, drop_remainder=True).enumerate().map(permute).unbatch()


def _folder_images(
    root: str, settings: DataSettings, key: tf.Tensor, process_index: int, process_count: int
) -> tf.data.Dataset:
    paths = _shard(images.list_image_files(root), process_index, process_count, root)
    path_table = tf.constant(paths)

    def load(index: tf.Tensor) -> tf.Tensor:
        path = tf.gather(path_table, index)
        decoded = _decode(tf.io.read_file(path), path, settings.num_channels)
        return _fit(decoded, settings.image_size)

    return _random_access(len(paths), load, key)


def _fashion_mnist_images(
    settings: DataSettings, key: tf.Tensor, process_index: int, process_count: int
) -> tf.data.Dataset:
    data_dir = settings.data_dir or fashion_mnist.DEFAULT_DIR
    grey, _ = fashion_mnist.load(settings.split, data_dir)
    shard = fashion_mnist.pad_to(grey[process_index::process_count])[..., np.newaxis]
    if len(shard) == 0:
        raise ValueError(f"Fashion-MNIST {settings.split} has fewer images than processes.")
    table = tf.constant(shard)

    def load(index: tf.Tensor) -> tf.Tensor:
        image = _match_channels(tf.gather(table, index), settings.num_channels, data_dir)
        return _fit(image, settings.image_size)

    return _random_access(len(shard), load, key)


def _tfrecord_images(
    settings: DataSettings, seed: int, key: tf.Tensor, process_index: int, process_count: int
) -> tf.data.Dataset:
    files = sorted(tf.io.gfile.glob(settings.path))
    if not files:
        raise FileNotFoundError(f"No TFRecord files match {settings.path!r}.")
    shard_files = len(files) >= process_count
    if shard_files:
        files = files[process_index::process_count]
    if not any(True for _ in tf.data.TFRecordDataset(files).take(1)):
        raise ValueError(f"TFRecord files {files} hold no records.")
    file_table = tf.constant(files)
    # Without process index: when records (not files) are sharded, every host must
    # walk the same file order or the shards would overlap.
    file_key = _stream_key(seed, _STREAM_FILE_ORDER)

    def epoch_files(epoch: tf.Tensor) -> tf.data.Dataset:
        order = _permuted_position(
            tf.range(len(files), dtype=tf.int64), len(files), _fold_in(file_key, epoch)
        )
        return tf.data.Dataset.from_tensor_slices(tf.gather(file_table, order))

    def records(path: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(path).map(lambda record: (record, path))

    def load(record: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
        spec = {"image": tf.io.FixedLenFeature([], tf.string, default_value="")}
        encoded = tf.io.parse_single_example(record, spec)["image"]
        check = tf.debugging.Assert(
            tf.strings.length(encoded) > 0,
            ["TFRecord record without bytes feature 'image' in", path],
        )
        with tf.control_dependencies([check]):
            decoded = _decode(encoded, path, settings.num_channels)
        return _fit(decoded, settings.image_size)

    ds = tf.data.Dataset.counter().flat_map(epoch_files)
    ds = ds.interleave(records, cycle_length=min(len(files), 8), num_parallel_calls=_AUTOTUNE)
    if not shard_files:
        ds = ds.shard(process_count, process_index)
    ds = ds.map(load, num_parallel_calls=_AUTOTUNE)
    return _window_shuffle(ds, settings.shuffle_window, key)


def _tfds_images(
    settings: DataSettings, key: tf.Tensor, process_index: int, process_count: int
) -> tf.data.Dataset:
    builder = tfds.builder(settings.name, data_dir=settings.data_dir or None)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {settings.name!r} is not prepared in {builder.data_dir!r}; "
            "prepare it first (this pipeline never downloads)."
        )
    features = builder.info.features
    if settings.image_key not in features:
        raise ValueError(
            f"TFDS dataset {settings.name!r} has no feature {settings.image_key!r} "
            f"(features: {sorted(features.keys())})."
        )
    split = tfds.even_splits(settings.split, n=process_count)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=False)
    origin = f"TFDS {settings.name}:{settings.image_key}"

    def load(example: dict) -> tf.Tensor:
        image = _match_channels(example[settings.image_key], settings.num_channels, origin)
        return _fit(image, settings.image_size)

    ds = ds.repeat().map(load, num_parallel_calls=_AUTOTUNE)
    return _window_shuffle(ds, settings.shuffle_window, key)


def _source_images(
    settings: DataSettings, seed: int, process_index: int, process_count: int
) -> tf.data.Dataset:
    """Infinite, shuffled stream of uint8 [S, S, C] images of the configured source."""
    key = _stream_key(seed, _STREAM_EXAMPLE_ORDER, process_index)
    if settings.source == "folder":
        return _folder_images(settings.path, settings, key, process_index, process_count)
    if settings.source == "emoji":
        emoji.build_emoji_folder(settings.path, size=settings.image_size)
        root = os.path.join(settings.path, settings.split)
        return _folder_images(root, settings, key, process_index, process_count)
    if settings.source == "fashion_mnist":
        return _fashion_mnist_images(settings, key, process_index, process_count)
    if settings.source == "tfrecord":
        return _tfrecord_images(settings, seed, key, process_index, process_count)
    return _tfds_images(settings, key, process_index, process_count)


def _to_model_input(
    index: tf.Tensor, image: tf.Tensor, settings: DataSettings, flip_key: tf.Tensor
) -> dict[str, tf.Tensor]:
    if settings.random_flip:
        coin = tf.random.stateless_uniform([], seed=_fold_in(flip_key, index))
        image = tf.cond(coin < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)
    pixels = tf.cast(image, tf.float32)
    if settings.value_range == "0_1":
        return {"image": pixels / 255.0}
    return {"image": pixels / 127.5 - 1.0}


def train_dataset(
    config: ml_collections.ConfigDict,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """Infinite, shuffled, deterministic batches `{"image": float32 [B, S, S, C]}`.

    Args:
      config: Data config (fields in the module docstring; missing ones take defaults).
      batch_size: Per-process batch size; incomplete batches are dropped.
      seed: Keys shuffling and flips; the same seed gives the same batches.
      process_index: This host's index (default `jax.process_index()`).
      process_count: Number of hosts (default `jax.process_count()`); each host
        reads a disjoint shard of the files or examples.

    Returns:
      A prefetched dataset whose images lie in [-1, 1] (or [0, 1] if
      `value_range="0_1"`).
    """
    settings = parse_config(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    flip_key = _stream_key(seed, _STREAM_FLIP, process_index)
    ds = _source_images(settings, seed, process_index, process_count).enumerate()
    ds = ds.map(
        lambda index, image: _to_model_input(index, image, settings, flip_key),
        num_parallel_calls=_AUTOTUNE,
    )
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def numpy_batches(ds: tf.data.Dataset) -> Iterator[np.ndarray]:
    """Image batches of `train_dataset` as numpy arrays, ready for `jax.device_put`."""
    for batch in ds.as_numpy_iterator():
        yield batch["image"]
