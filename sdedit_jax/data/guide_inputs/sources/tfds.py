"""The ``tfds`` source: a prepared TFDS data set (never downloaded); ids are its ``tfds_id``.

Its block: ``config.input.tfds`` (``name``, ``split``, ``data_dir``, ``image_key``,
``mask_key``); before it, these were the flat ``config.input.tfds_*`` keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from sdedit_jax.data.guide_inputs.catalog import Catalog, Source, _catalog, _plain, _Row

NAME = "tfds"


@dataclasses.dataclass(frozen=True)
class Options:
    """``config.input.tfds``.

    Attributes:
        name: the TFDS data set name (required).
        split: the TFDS split.
        data_dir: the TFDS data folder (None = TFDS's default).
        image_key: the Image feature holding the guide.
        mask_key: the Image feature holding the mask ('' = none).
    """

    name: str = ""
    split: str = "test"
    data_dir: str | None = None
    image_key: str = "image"
    mask_key: str = ""

    def __post_init__(self):
        for field in ("name", "split", "image_key", "mask_key"):
            if not isinstance(getattr(self, field), str):
                raise ValueError(f"{field}: expected a string, got {getattr(self, field)!r}")
        if not (self.data_dir is None or isinstance(self.data_dir, str)):
            raise ValueError(f"data_dir: expected a folder or None, got {self.data_dir!r}")


def _tfds_catalog(config: Any) -> Catalog:
    """The examples of the split (``config``: a ``GuideInputConfig``), in TFDS's file order."""
    import tensorflow_datasets as tfds

    options = config.options[NAME]
    builder = tfds.builder(options.name, data_dir=options.data_dir)
    keys = [k for k in (options.image_key, options.mask_key) if k]
    features = builder.info.features
    for key in keys:
        if key not in features.keys() or not isinstance(features[key], tfds.features.Image):
            raise ValueError(f"tfds: {options.name} has no Image feature {key!r}")

    def examples() -> tf.data.Dataset:
        # One file at a time keeps the order identical on every pass and host.
        return builder.as_dataset(
            split=options.split,
            shuffle_files=False,
            decoders={k: tfds.decode.SkipDecoding() for k in keys},
            read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1),
        )

    ids = [i.decode() for i in examples().map(_plain(lambda e: e["tfds_id"])).as_numpy_iterator()]
    where = f"tfds://{options.name}/{options.split}"
    rows = [_Row(id=i, source=f"{where}/{i}", t0=config.t0, seed=config.seed) for i in ids]

    def payload() -> tf.data.Dataset:
        mask_key = options.mask_key
        return examples().map(
            _plain(
                lambda e: {
                    "record": "",
                    "guide_bytes": e[options.image_key],
                    "mask_bytes": e[mask_key] if mask_key else tf.constant(b""),
                }
            )
        )

    return _catalog(rows, payload)


SOURCE = Source(
    NAME,
    _tfds_catalog,
    Options,
    required=("tfds.name",),
    moved={f"tfds_{field}": field for field in dataclasses.asdict(Options())},
)
