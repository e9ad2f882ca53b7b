"""The guide input config: cross-source fields, each source's own block, and the limits.

Fields every source shares are flat (``config.input.path``, ``.resize``, ...); a
source's own options are its block (``config.input.tfds.name``), declared by its
module in :mod:`.sources`. The flat keys those blocks replaced (``tfds_name``,
``mask_dir``) are refused by name: ``tfds_name: moved to tfds.name``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from sdedit_jax.data import guides
from sdedit_jax.data.guide_inputs import sources
from sdedit_jax.data.guide_inputs.catalog import SEED_RANGE
from sdedit_jax.data.guide_inputs.micro import MicroInputs
from sdedit_jax.data.guide_inputs.text import TextInputs
from sdedit_jax.util.config import frozen, unknown_field

SOURCES = tuple(sources.by_name())  # the names of sources.MODULES
GENERATOR_NAMES = ("none", *guides.GENERATORS)
# The t0 rule: an input that names its own t0 (a manifest or TFRecord field) is
# edited once, at that t0 ("own" rows: the job's ``t0_per_example`` sub-job);
# every other input is edited at each configured t0 ("configured" rows).
T0_ROWS = ("all", "configured", "own")
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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
        source: one of ``SOURCES`` (see the package docstring).
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
        options: each source's own block by source name (``{"tfds": {"name": ...}}``;
            mappings or the source's ``Options``); every source with a block gets
            one, defaults filled in, so ``options["tfds"].name`` always exists.
        text: the rows' text defaults when the model takes prompts (a
            :class:`~sdedit_jax.data.guide_inputs.text.TextInputs` or a mapping of
            its fields); None: the model takes no text, rows naming some fail.
        micro: the rows' SDXL micro-conditioning defaults and the fields the model
            reads (a :class:`~sdedit_jax.data.guide_inputs.micro.MicroInputs`); None:
            not an SDXL model, rows naming some fail.
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
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    text: TextInputs | None = None
    micro: MicroInputs | None = None
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
        known = sources.by_name()
        if self.source not in known:
            raise ValueError(f"source: expected one of {tuple(known)}, got {self.source!r}")
        object.__setattr__(self, "options", _options(self.options, known))
        if self.text is not None:
            try:
                object.__setattr__(self, "text", frozen(TextInputs, self.text, ""))
            except (TypeError, ValueError) as e:
                raise ValueError(f"text.{e}") from None
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
        for name in ("path", "generator"):
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
        for name in known[self.source].required:
            block, _, field = name.rpartition(".")
            if not getattr(self.options[block] if block else self, field):
                raise ValueError(f"{name}: required when source is {self.source!r}")

    def in_time_domain(self, t0: float) -> bool:
        """Whether ``t0`` lies in ``(eps, T]``."""
        return math.isfinite(t0) and self.time_domain[0] < t0 <= self.time_domain[1]

    def time_domain_text(self) -> str:
        return f"({self.time_domain[0]:g}, {self.time_domain[1]:g}]"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> GuideInputConfig:
        """Builds a config from a dict or ``ml_collections.ConfigDict``: flat fields plus
        one block per source (``{"source": "tfds", "tfds": {"name": ...}}``).

        Unknown keys fail; a flat key of earlier versions fails naming its new place.
        """
        values = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
        moved = moved_fields()
        blocks = [name for name, source in sources.by_name().items() if source.options]
        flat = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "options"]
        for key in sorted(values):
            if key in moved:
                raise ValueError(f"{key}: moved to {moved[key]}")
            if key not in flat and key not in blocks:
                raise ValueError(unknown_field(key, values[key], [*flat, *blocks]))
        options = {name: values.pop(name) for name in blocks if name in values}
        return frozen(cls, {**values, "options": options}, "")


def _options(blocks: Any, known: Mapping[str, sources.Source]) -> dict[str, Any]:
    """Every source's block built (its ``Options``, defaults filled in), by source name."""
    if not isinstance(blocks, Mapping):
        raise ValueError(f"options: expected a mapping of source name to block, got {blocks!r}")
    with_options = {name: source.options for name, source in known.items() if source.options}
    unknown = sorted(set(blocks) - set(with_options))
    if unknown:
        raise ValueError(unknown_field(unknown[0], blocks[unknown[0]], list(with_options)))
    built = {}
    for name, options in with_options.items():
        try:
            built[name] = frozen(options, blocks.get(name, {}), name, error=_UnknownKey)
        except _UnknownKey:
            raise
        except (TypeError, ValueError) as e:  # from the block's __post_init__
            raise ValueError(f"{name}.{e}") from None
    return built


class _UnknownKey(ValueError):
    """A key a source's block does not declare (its message names the block already)."""


def moved_fields(block: str = "") -> dict[str, str]:
    """The flat keys the sources' blocks replaced -> their new names (``"tfds.name"``),
    both under ``block`` when given (``moved_fields("input")["input.tfds_name"]``)."""
    prefix = f"{block}." if block else ""
    return {
        f"{prefix}{old}": f"{prefix}{name}.{new}"
        for name, source in sources.by_name().items()
        for old, new in source.moved.items()
    }


def _as_config(config) -> GuideInputConfig:
    return config if isinstance(config, GuideInputConfig) else GuideInputConfig.from_mapping(config)
