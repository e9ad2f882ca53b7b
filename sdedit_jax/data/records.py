"""TFRecord I/O: the ``tf.train.Example`` layouts the tfrecord sources read, and their writers.

* :func:`tf_example` / :func:`record_fields`: one guide example (``image``, optional
  ``mask``, ``id``, ``t0``, ``seed``) for the edit job's ``"tfrecord"`` guide source.
* :func:`write_tfrecords`: training images copied into shards for the training
  input's ``"tfrecord"`` source.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from sdedit_jax.data import images


def tf_example(
    image: bytes,
    *,
    id: str | None = None,
    mask: bytes | None = None,
    t0: float | None = None,
    seed: int | None = None,
) -> bytes:
    """A serialized ``tf.train.Example`` in the layout the ``"tfrecord"`` source reads."""
    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}
    if id is not None:
        feature["id"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[id.encode()]))
    if mask is not None:
        feature["mask"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[mask]))
    if t0 is not None:
        feature["t0"] = tf.train.Feature(float_list=tf.train.FloatList(value=[t0]))
    if seed is not None:
        feature["seed"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[seed]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


_RECORD_KINDS = {
    "image": "bytes_list",
    "mask": "bytes_list",
    "id": "bytes_list",
    "t0": "float_list",
    "seed": "int64_list",
}


def record_fields(record: bytes) -> dict[str, Any]:
    """The known features of a serialized example (one value each), or ValueError naming one."""
    try:
        example = tf.train.Example.FromString(record)
    except Exception as e:  # protobuf raises its own DecodeError type
        raise ValueError(f"not a tf.train.Example ({type(e).__name__}: {e})") from e
    fields = {}
    for name, kind in _RECORD_KINDS.items():
        if name not in example.features.feature:
            continue
        feature = example.features.feature[name]
        if feature.WhichOneof("kind") != kind:
            raise ValueError(f"feature {name!r}: expected {kind}, got {feature.WhichOneof('kind')}")
        values = getattr(feature, kind).value
        if len(values) != 1:
            raise ValueError(f"feature {name!r}: expected one value, got {len(values)}")
        fields[name] = values[0]
    if "image" not in fields:
        raise ValueError("feature 'image': missing")
    return fields


def write_tfrecords(folder: str, out_prefix: str, num_shards: int) -> list[str]:
    """Copies the encoded images of `folder` into TFRecord shards, without re-encoding.

    Files are dealt round-robin in `list_image_files` order. Each record holds the
    bytes feature `image` (read by the "tfrecord" source) and `filename` (the path
    relative to `folder`). Shards are named `<out_prefix>-00000-of-0000N`, so
    `config.path = out_prefix + "-*"` reads them all.

    Returns:
      The shard paths.
    """
    paths = images.list_image_files(folder)
    if not 1 <= num_shards <= len(paths):
        raise ValueError(f"num_shards={num_shards} must lie in [1, {len(paths)}] for {folder}.")
    tf.io.gfile.makedirs(os.path.dirname(os.path.abspath(out_prefix)))
    shard_paths = [f"{out_prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    for shard, shard_path in enumerate(shard_paths):
        with tf.io.TFRecordWriter(shard_path) as writer:
            for path in paths[shard::num_shards]:
                with open(path, "rb") as f:
                    encoded = f.read()
                name = os.path.relpath(path, folder).encode("utf-8")
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                    "filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
    return shard_paths
