"""The guide input config: sources, fields and the limits every input is checked against."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from sdedit_jax.data import guides
from sdedit_jax.util.config import frozen

SOURCES = ("folder", "tfrecord", "tfds", "manifest")
GENERATOR_NAMES = ("none", *guides.GENERATORS)
GUIDE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy")
MASK_EXTENSIONS = (".png", ".npy")
MANIFEST_FIELDS = ("path", "mask", "t0", "seed", "id")
# The t0 rule: an input that names its own t0 (a manifest or TFRecord field) is
# edited once, at that t0 ("own" rows: the job's ``t0_per_example`` sub-job);
# every other input is edited at each configured t0 ("configured" rows).
T0_ROWS = ("all", "configured", "own")
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Seeds become int32 jax.random keys: every seed (config, manifest, record) must fit.
SEED_RANGE = (0, 2**31)
# npy values may exceed the nominal range by float round-off.
_RANGE_TOLERANCE = 1e-3


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.number))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


@dataclasses.dataclass(frozen=True)
class GuideInputConfig:
    """Where a job's guides come from and how they are decoded.

    Attributes:
        source: one of ``SOURCES`` (see the module docstring).
        path: folder, manifest file, or comma-separated TFRecord globs.
        image_size: ``(height, width)`` of the model (an int means square).
        channels: 3 (RGB) or 1 (grayscale).
        resize: resize guides (bicubic) and masks (nearest) of another size to
            ``image_size``; otherwise such guides fail.
        t0: default SDEdit start time.
        time_domain: ``(eps, T)`` of the model's SDE: every ``t0`` must lie in
            ``(eps, T]``. The job sets it from the loaded model; the data layer
            restates no SDE constant (the default is the unit interval).
        seed: job seed, the default per-example seed.
        mask_dir: the masks folder inside a guide folder ("" = no masks).
        tfds_name, tfds_split, tfds_data_dir: the TFDS data set.
        tfds_image_key, tfds_mask_key: its image and (optional) mask features.
        generator: ``"none"`` or a guide generator name (see ``guides.GENERATORS``).
        generator_kwargs: keyword arguments of the generator.
        max_pixels: larger images fail before they are decoded.
        num_parallel_calls: decode parallelism (-1 = autotune).
        prefetch_batches: batches prefetched ahead of the device loop.
    """

    source: str
    path: str = ""
    image_size: tuple[int, int] = (256, 256)
    channels: int = 3
    resize: bool = False
    t0: float = 0.5
    time_domain: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    mask_dir: str = "masks"
    tfds_name: str = ""
    tfds_split: str = "test"
    tfds_data_dir: str | None = None
    tfds_image_key: str = "image"
    tfds_mask_key: str = ""
    generator: str = "none"
    generator_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The generator built from generator and generator_kwargs (None for "none").
    guide_generator: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)
    max_pixels: int = 1 << 26
    num_parallel_calls: int = tf.data.AUTOTUNE
    prefetch_batches: int = 2

    def __post_init__(self):
        size = self.image_size
        size = (size, size) if _is_int(size) else size
        if not (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(_is_int(s) and s >= 1 for s in size)
        ):
            raise ValueError(
                f"image_size: expected (height, width) of positive ints, got {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", tuple(int(s) for s in size))
        object.__setattr__(self, "generator", self.generator or "none")
        if not isinstance(self.generator_kwargs, Mapping):
            raise ValueError(f"generator_kwargs: expected a mapping, got {self.generator_kwargs!r}")
        object.__setattr__(self, "generator_kwargs", dict(self.generator_kwargs))
        if self.source not in SOURCES:
            raise ValueError(f"source: expected one of {SOURCES}, got {self.source!r}")
        if self.channels not in (1, 3) or not _is_int(self.channels):
            raise ValueError(f"channels: expected 1 or 3, got {self.channels!r}")
        domain = self.time_domain
        if not (
            isinstance(domain, (tuple, list))
            and len(domain) == 2
            and all(_is_number(d) for d in domain)
            and 0 <= domain[0] < domain[1]
        ):
            raise ValueError(f"time_domain: expected (eps, T) with 0 <= eps < T, got {domain!r}")
        if not (_is_number(self.t0) and self.in_time_domain(self.t0)):
            raise ValueError(f"t0: expected a number in {self.time_domain_text()}, got {self.t0!r}")
        if not (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise ValueError(f"seed: expected an integer in [0, 2^31), got {self.seed!r}")
        for name in ("max_pixels", "prefetch_batches"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not (
            _is_int(self.num_parallel_calls)
            and (self.num_parallel_calls >= 1 or self.num_parallel_calls == tf.data.AUTOTUNE)
        ):
            raise ValueError(
                f"num_parallel_calls: expected a positive int or -1 (autotune), "
                f"got {self.num_parallel_calls!r}"
            )
        for name in (
            "path",
            "mask_dir",
            "tfds_name",
            "tfds_split",
            "tfds_image_key",
            "tfds_mask_key",
            "generator",
        ):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if not isinstance(self.resize, bool):
            raise ValueError(f"resize: expected True or False, got {self.resize!r}")
        if self.generator not in GENERATOR_NAMES:
            raise ValueError(
                f"generator: expected one of {GENERATOR_NAMES}, got {self.generator!r}"
            )
        if self.generator != "none":
            # Built here, so a bad option is a config error before any input is read.
            try:
                built = frozen(guides.GENERATORS[self.generator], self.generator_kwargs, "")
            except (TypeError, ValueError) as e:
                raise ValueError(f"generator_kwargs.{e}") from None
            object.__setattr__(self, "guide_generator", built)
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("tfds_name: required when source is 'tfds'")
        if self.source != "tfds" and not self.path:
            raise ValueError(f"path: required when source is {self.source!r}")

    def in_time_domain(self, t0: float) -> bool:
        """Whether ``t0`` lies in ``(eps, T]``."""
        return math.isfinite(t0) and self.time_domain[0] < t0 <= self.time_domain[1]

    def time_domain_text(self) -> str:
        return f"({self.time_domain[0]:g}, {self.time_domain[1]:g}]"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> GuideInputConfig:
        """Builds a config from a dict or ``ml_collections.ConfigDict`` (unknown keys fail)."""
        return frozen(cls, mapping, "")


def _as_config(config) -> GuideInputConfig:
    return config if isinstance(config, GuideInputConfig) else GuideInputConfig.from_mapping(config)
