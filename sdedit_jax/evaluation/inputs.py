"""What a sweep edits: guides synthesised per task, the reference set, sampler variants, t0s."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections
import numpy as np

from sdedit_jax.data import guide_inputs
from sdedit_jax.sampling.sampler import Sampler, sampler_from_config
from sdedit_jax.sampling.steps import StepRule

BASELINE_VARIANT = "guides"


# Evaluation sets these input fields itself (from the model and the tasks).
_MANAGED_INPUT_FIELDS = ("generator", "generator_kwargs", "image_size", "channels", "seed", "t0")


_LOAD_BATCH = 64


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images of one task (guides) or of the reference, in canonical order, in ``[-1, 1]``."""

    name: str
    ids: list[str]
    images: np.ndarray  # [N, H, W, C] float32
    masks: np.ndarray  # [N, H, W, 1] float32, 1 = editable

    @property
    def masked(self) -> bool:
        """Whether any pixel must be kept (only then are inside/outside scores meaningful)."""
        return bool(np.any(self.masks < 1.0))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One sampler setting of the sweep: a compiled program shared by every t0 and task."""

    name: str
    sampler: Sampler
    step_rule: StepRule
    repeats: int


def _input_mapping(base: Mapping, field: str, **managed) -> dict:
    """``base`` plus the fields evaluation controls; setting those in the config is an error."""
    values = dict(base)
    clash = sorted(set(values) & set(_MANAGED_INPUT_FIELDS))
    if clash:
        raise ValueError(
            f"{field}: do not set {clash}; evaluation derives them from the model, "
            "tasks, generator_kwargs and seed"
        )
    return {**values, **managed}


def load_image_set(input_config: Mapping, name: str, what: str, limit: int = 0) -> ImageSet:
    """Reads the first ``limit`` (0 = all) examples of a guide input in canonical order.

    ``name`` names the set (a task), ``what`` describes it in errors.

    Raises:
        ValueError: some examples failed to decode (listing them), or none exist.
    """
    try:
        stream = guide_inputs.make_guide_dataset(
            input_config, batch_size_per_host=_LOAD_BATCH, process_index=0, process_count=1
        )
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    ids, images, masks, errors = [], [], [], []
    for batch in stream.dataset.as_numpy_iterator():
        for row in np.nonzero(batch["valid"])[0]:
            if not batch["ok"][row]:
                errors.append(batch["error"][row].decode())
                continue
            ids.append(batch["id"][row].decode())
            images.append(batch["guide"][row])
            masks.append(batch["mask"][row])
        if limit and len(ids) >= limit:
            break
    if errors:
        listed = "\n  ".join(errors[:10])
        raise ValueError(f"{what}: {len(errors)} input(s) failed (fix or remove them):\n  {listed}")
    if not ids:
        raise ValueError(f"{what}: no images in {input_config.get('path')!r}")
    keep = limit or len(ids)
    return ImageSet(name, ids[:keep], np.stack(images[:keep]), np.stack(masks[:keep]))


def task_generator(config: ml_collections.ConfigDict, task: str) -> tuple[str, dict]:
    """(generator name, its keyword arguments) of one task.

    A task is a guide generator's name, or any name whose
    ``config.generator_kwargs`` entry names its ``generator`` (so one generator
    can appear twice with different settings, e.g. a cruder stroke painting).
    """
    kwargs = config.generator_kwargs.get(task, {})
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
    generator = kwargs.pop("generator", task)
    if generator not in guide_inputs.GENERATOR_NAMES:
        raise ValueError(
            f"config.tasks: task {task!r} uses generator {generator!r}; known: "
            f"{', '.join(guide_inputs.GENERATOR_NAMES)} (or name one in "
            f"config.generator_kwargs.{task}.generator)"
        )
    return generator, kwargs


def load_guides(
    config: ml_collections.ConfigDict, task: str, image_size: int, channels: int
) -> ImageSet:
    """The guides of one task (see :func:`task_generator`), made from ``config.input``'s images."""
    generator, kwargs = task_generator(config, task)
    mapping = _input_mapping(
        config.input.to_dict(),
        "config.input",
        generator=generator,
        generator_kwargs=kwargs,
        image_size=(image_size, image_size),
        channels=channels,
        seed=config.seed,
    )
    return load_image_set(
        mapping, task, f"config.input (guides of task {task!r})", config.max_guides
    )


def with_samples(guides: ImageSet, samples: int) -> ImageSet:
    """Each guide ``samples`` times; copy ``k > 0`` of id ``i`` is ``i#k`` (its own noise).

    Copy 0 keeps the plain id, so a run with more samples per guide extends
    (and reproduces) the run with one.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"config.samples_per_guide: must be a positive int, got {samples!r}")
    ids = [i if k == 0 else f"{i}#{k}" for k in range(samples) for i in guides.ids]
    return ImageSet(
        guides.name,
        ids,
        np.tile(guides.images, (samples, 1, 1, 1)),
        np.tile(guides.masks, (samples, 1, 1, 1)),
    )


def load_reference(config: ml_collections.ConfigDict, image_size: int, channels: int) -> ImageSet:
    """The real images realism is measured against, all paths concatenated in order."""
    reference = config.reference.to_dict()
    paths = reference.pop("paths")
    limit = reference.pop("max_images")
    if not paths:
        raise ValueError("config.reference.paths: give at least one source of real images")
    parts = []
    for path in paths:
        mapping = _input_mapping(
            dict(reference, path=path),
            "config.reference",
            image_size=(image_size, image_size),
            channels=channels,
        )
        parts.append(load_image_set(mapping, "reference", f"config.reference.paths ({path!r})"))
    ids = [f"{path}/{i}" for path, part in zip(paths, parts, strict=True) for i in part.ids]
    images = np.concatenate([p.images for p in parts])
    masks = np.concatenate([p.masks for p in parts])
    keep = limit or len(ids)
    return ImageSet("reference", ids[:keep], images[:keep], masks[:keep])


def variants_from_config(config: ml_collections.ConfigDict) -> list[Variant]:
    """The base sampler (``config.sampler``, ``config.repeats``) plus each override in ``variants``.

    A variant is a dict of ``config.sampler`` fields and/or ``repeats``, with
    an optional ``name`` (default: its overrides, e.g. ``predictor=ode_euler``).
    """
    base = config.sampler.to_dict()
    specs = [{"name": "base"}] + [dict(v) for v in config.variants]
    variants, names = [], set()
    for index, spec in enumerate(specs):
        where = "config.sampler" if index == 0 else f"config.variants[{index - 1}]"
        unknown = sorted(set(spec) - set(base) - {"name", "repeats"})
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; known: name, repeats, "
                f"{', '.join(sorted(base))}"
            )
        overrides = {k: v for k, v in spec.items() if k != "name"}
        name = str(spec.get("name") or ",".join(f"{k}={v}" for k, v in sorted(overrides.items())))
        if name in names or name == BASELINE_VARIANT:
            raise ValueError(f"{where}: variant name {name!r} is already used")
        names.add(name)
        repeats = overrides.pop("repeats", config.repeats)
        try:
            sampler, step_rule = sampler_from_config(
                ml_collections.ConfigDict({**base, **overrides})
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        variants.append(Variant(name, sampler, step_rule, repeats))
    return variants


def check_t0s(t0s, sde) -> tuple[float, ...]:
    """The sweep's start times, each in the SDE's ``(eps, T]``."""
    values = tuple(float(t) for t in t0s)
    if not values:
        raise ValueError("config.t0s: give at least one t0")
    bad = [t for t in values if not sde.eps < t <= sde.T]
    if bad:
        raise ValueError(f"config.t0s: {bad} outside ({sde.eps}, {sde.T}] (the SDE's eps..T)")
    if len(set(values)) != len(values):
        raise ValueError(f"config.t0s: repeated values in {values}")
    return values
