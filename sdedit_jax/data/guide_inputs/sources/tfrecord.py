"""The ``tfrecord`` source: ``path`` is comma-separated globs of ``tf.train.Example`` shards.

Canonical order: sorted shard names, then record order. Features: ``image``
(required), ``mask``, ``id``, ``t0``, ``seed`` (see the package docstring). No block
of its own: everything it reads is in the records.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow as tf

from sdedit_jax.data.guide_inputs.catalog import (
    Catalog,
    Source,
    _catalog,
    _parse_seed,
    _parse_t0,
    _plain,
    _Row,
)
from sdedit_jax.data.records import record_fields

NAME = "tfrecord"


def _record_row(record: bytes, shard: str, index: int, config: Any) -> _Row:
    source = f"{shard}#{index}"
    row = _Row(
        id=f"{os.path.basename(shard)}:{index}", source=source, t0=config.t0, seed=config.seed
    )
    try:
        fields = record_fields(record)
        raw_id = fields.get("id", row.id.encode())
        row_id = raw_id.decode("utf-8") if isinstance(raw_id, bytes) else raw_id
        if not row_id:
            raise ValueError("feature 'id': empty")
        row = dataclasses.replace(row, id=row_id)
    except (ValueError, UnicodeDecodeError) as e:
        return dataclasses.replace(row, error=f"tfrecord ({source}): {e}")
    try:
        t0 = _parse_t0(float(fields["t0"]), config) if "t0" in fields else config.t0
    except ValueError as e:
        return dataclasses.replace(row, error=f"tfrecord ({source}): feature 't0': {e}")
    try:
        seed = _parse_seed(int(fields["seed"])) if "seed" in fields else config.seed
    except ValueError as e:
        return dataclasses.replace(row, t0=t0, error=f"tfrecord ({source}): feature 'seed': {e}")
    return dataclasses.replace(row, t0=t0, seed=seed, t0_given="t0" in fields)


def _tfrecord_catalog(config: Any) -> Catalog:
    """Every record of the shards ``config.path`` (a ``GuideInputConfig``) globs, in order."""
    shards = sorted({f for pattern in config.path.split(",") for f in tf.io.gfile.glob(pattern)})
    if not shards:
        raise ValueError(f"path: no TFRecord files match {config.path!r}")
    rows, readable, corrupt = [], [], []
    for shard in shards:
        count, broken = 0, False
        try:
            for record in tf.data.TFRecordDataset(shard).as_numpy_iterator():
                rows.append(_record_row(record, shard, count, config))
                count += 1
        except tf.errors.OpError as e:
            # A corrupt record ends what can be read of a shard; the rest is
            # reported as one failure rather than dropped without a trace.
            broken = True
            rows.append(
                _Row(
                    id=f"{os.path.basename(shard)}:{count}",
                    source=f"{shard}#{count}",
                    t0=config.t0,
                    seed=config.seed,
                    error=f"tfrecord ({shard}): record {count} and all later records of this shard "
                    f"are unreadable ({type(e).__name__}: {e.message})",
                )
            )
        readable.append(count)
        corrupt.append(broken)

    def payload() -> tf.data.Dataset:
        def shard_records(path, count, broken):
            return (
                tf.data.TFRecordDataset(path)
                .take(count)
                .concatenate(
                    tf.data.Dataset.from_tensors(tf.constant(b"")).repeat(tf.cast(broken, tf.int64))
                )
            )

        records = tf.data.Dataset.from_tensor_slices(
            (shards, np.array(readable, np.int64), np.array(corrupt))
        ).flat_map(_plain(shard_records))
        return records.map(_plain(lambda r: {"record": r, "guide_bytes": "", "mask_bytes": ""}))

    return _catalog(rows, payload)


SOURCE = Source(NAME, _tfrecord_catalog)
