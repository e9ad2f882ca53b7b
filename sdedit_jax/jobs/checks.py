"""The job's configuration, checked before any work: :class:`JobConfig` and its parts.

Why typed blocks: the job reads its settings from one frozen :class:`JobConfig` built
from the ``ConfigDict`` at the boundary (:func:`check_config`), so every field is
checked once, by the rule declared beside it, and a bad value is one line naming
the field, the value and what is allowed (:class:`ConfigError`, exit status 2).
The checks against the loaded model (:func:`check_model`, :func:`check_batch`)
and the input source (:func:`build_catalog`) follow once the model is known.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from sdedit_jax import pretrained
from sdedit_jax.data import guide_inputs
from sdedit_jax.jobs import sinks
from sdedit_jax.latent import codec, sdxl
from sdedit_jax.sampling.sampler import sampler_from_config
from sdedit_jax.sde import SDE
from sdedit_jax.util import config as config_files
from sdedit_jax.util import files

# Seconds between progress reports when a config has no ``progress_every_s``.
PROGRESS_EVERY_S = 10.0
# Image-sized float32 arrays one row of a compiled step holds at least (guide, mask,
# state, noise, score, ...); the network's own activations come on top.
ARRAYS_PER_ROW = 8
STEP_FIELDS = ("steps_per_unit_time", "n_steps", "max_steps")


class ConfigError(ValueError):
    """A configuration or startup problem; the message is one line naming field, value, rule."""


def field_error(field: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error of ``config.<field>`` holding ``value``."""
    return ConfigError(f"config.{field}: got {value!r}; expected {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (
        isinstance(value, (int, float, np.number))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )


# A field's rule: the allowed values in words when ``value`` breaks it, else None.
Rule = Callable[[Any], "str | None"]


def _rule(ok: Callable[[Any], bool], allowed: str) -> Rule:
    return lambda value: None if ok(value) else allowed


def _checked(rule: Rule, **kwargs) -> Any:
    """A dataclass field checked by ``rule`` (see :func:`_check_fields`)."""
    return dataclasses.field(metadata={"rule": rule}, **kwargs)


def _check_fields(block: Any, prefix: str) -> None:
    """Every field of ``block`` against its rule, in declaration order."""
    for field in dataclasses.fields(block):
        rule = field.metadata.get("rule")
        value = getattr(block, field.name)
        allowed = rule(value) if rule else None
        if allowed:
            raise field_error(prefix + field.name, value, allowed)


def _t0s_rule(t0s: Any) -> str | None:
    allowed = "a non-empty tuple of distinct start times in (0, 1], e.g. (0.3, 0.5)"
    if not (isinstance(t0s, (tuple, list)) and len(t0s) > 0):
        return allowed
    for t0 in t0s:
        if not (_is_real(t0) and 0 < t0 <= 1):
            return allowed + f" ({t0!r} is not)"
    if len({float(np.float32(t0)) for t0 in t0s}) != len(t0s):
        return allowed + " (distinct as float32)"
    return None


_BOOL = _rule(lambda v: isinstance(v, bool), "True or False")


def _prefixed(error: Exception, prefix: str) -> ConfigError:
    """A field-naming ValueError (``"name: ..."``) re-raised under ``config.<prefix>``."""
    text = " ".join(str(error).split())
    head, sep, _ = text.partition(": ")
    dotted = sep and head.replace("_", "").replace(".", "").isalnum()
    return ConfigError(f"config.{prefix}.{text}" if dotted else f"config.{prefix}: {text}")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """``config.output``: the files each edit writes (see :mod:`sdedit_jax.jobs.sinks`).

    No defaults: ``configs/default.py`` holds them (one place).
    """

    png: bool = _checked(_BOOL)
    npz: str = _checked(_rule(lambda v: v in sinks.NPZ_MODES, f"one of {sinks.NPZ_MODES}"))
    png_compression: int = _checked(
        _rule(
            lambda v: _is_int(v) and 0 <= v <= 9,
            "an int in 0..9 (zlib level: 1 is fast, 9 is smallest)",
        )
    )
    writer_threads: int | None = _checked(
        _rule(
            lambda v: v is None or (_is_int(v) and v >= 1), "None (one per CPU core) or an int >= 1"
        )
    )

    def __post_init__(self):
        _check_fields(self, "output.")
        if not self.png and self.npz == "none":
            raise field_error(
                "output.png",
                self.png,
                "True, unless output.npz is 'per_example' or 'shards' (a job needs an output)",
            )


# The VAE codec's options: how guides become latents, masks a latent grid.
POSTERIORS, MASK_DOWNSAMPLES = codec.POSTERIORS, codec.MASK_DOWNSAMPLES
# The guidance scale of rows and jobs that name none: diffusers' default.
DEFAULT_GUIDANCE_SCALE = 7.5
# SDXL's micro-conditioning when a config has no sdxl block: the pipelines' defaults.
SDXL_DEFAULTS = {
    "original_size": None,
    "crops_coords_top_left": (0, 0),
    "target_size": None,
    "aesthetic_score": 6.0,
    "negative_aesthetic_score": 2.5,
}


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """``config.latent``: the codec settings of latent models (defaults in ``configs/default.py``).

    ``posterior``: ``"mean"`` encodes a guide to its VAE posterior mean, ``"sample"``
    to a draw from the example's own key. ``mask_downsample``: ``"max_pool"`` makes a
    latent cell editable when any of its pixels is (thin strokes survive),
    ``"nearest"`` resizes and thresholds at 0.5 as diffusers does.
    """

    posterior: str = _checked(_rule(lambda v: v in POSTERIORS, f"one of {POSTERIORS}"))
    mask_downsample: str = _checked(
        _rule(lambda v: v in MASK_DOWNSAMPLES, f"one of {MASK_DOWNSAMPLES}")
    )

    def __post_init__(self):
        _check_fields(self, "latent.")


def _optional_pair(value: Any) -> bool:
    """None, or a (height, width)-like pair of numbers >= 0."""
    return value is None or (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_real(v) and v >= 0 for v in value)
    )


@dataclasses.dataclass(frozen=True)
class SDXLConfig:
    """``config.sdxl``: the micro-conditioning of SDXL models: every row's, unless a manifest
    row names its own (:mod:`sdedit_jax.data.guide_inputs.micro`).

    ``original_size`` and ``target_size``: ``(height, width)`` in pixels, None for the
    guides' size; ``crops_coords_top_left``: ``(top, left)``; ``aesthetic_score`` and
    ``negative_aesthetic_score``: the refiner's (the pipelines' defaults 6.0 and 2.5).
    """

    original_size: tuple | None = _checked(_rule(_optional_pair, "None or (height, width)"))
    crops_coords_top_left: tuple = _checked(
        _rule(lambda v: v is not None and _optional_pair(v), "(top, left) pixels >= 0")
    )
    target_size: tuple | None = _checked(_rule(_optional_pair, "None or (height, width)"))
    aesthetic_score: float = _checked(_rule(_is_real, "a finite number"))
    negative_aesthetic_score: float = _checked(_rule(_is_real, "a finite number"))

    def __post_init__(self):
        _check_fields(self, "sdxl.")


def _optional_text(value: Any) -> bool:
    return value is None or (isinstance(value, str) and guide_inputs.text.is_utf8(value))


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Every setting a job reads (``configs/default.py`` lists and documents them).

    ``input`` and ``sampler`` stay blocks: :meth:`input_config` and
    ``sampler_from_config`` make their typed forms (both checked here too).
    Built by :func:`check_config`; ``output`` becomes an :class:`OutputConfig`.
    """

    t0s: tuple[float, ...] = _checked(_t0s_rule)
    repeats: int = _checked(_rule(lambda v: _is_int(v) and v >= 1, "an int >= 1 (SDEdit's K)"))
    seed: int = _checked(_rule(lambda v: _is_int(v) and 0 <= v < 2**31, "an int in [0, 2^31)"))
    per_device_batch: int = _checked(_rule(lambda v: _is_int(v) and v >= 1, "an int >= 1"))
    contact_sheet: bool = _checked(_BOOL)
    model_dir: str = _checked(
        _rule(
            lambda v: isinstance(v, str) and bool(v),
            "a model folder, or 'default' for the shipped model",
        )
    )
    overwrite: bool = _checked(_BOOL)
    sampler: Mapping[str, Any]
    input: Mapping[str, Any]
    output: OutputConfig
    progress_every_s: float = _checked(
        _rule(lambda v: _is_real(v) and v > 0, "seconds > 0 between progress reports"),
        default=PROGRESS_EVERY_S,
    )
    prompt: str | None = _checked(
        _rule(_optional_text, "a string (UTF-8), or None for rows to name their own"),
        default=None,
    )
    negative_prompt: str = _checked(
        _rule(lambda v: isinstance(v, str) and _optional_text(v), "a string (UTF-8)"), default=""
    )
    guidance_scale: float | None = _checked(
        _rule(
            lambda v: v is None or (_is_real(v) and v >= 0),
            f"a finite number >= 0, or None ({DEFAULT_GUIDANCE_SCALE})",
        ),
        default=None,
    )
    latent: LatentConfig = dataclasses.field(default_factory=LatentConfig)
    sdxl: SDXLConfig | None = None

    def __post_init__(self):
        _check_fields(self, "")
        latent = config_files.frozen(LatentConfig, self.latent, "config.latent", error=ConfigError)
        object.__setattr__(self, "latent", latent)
        sdxl_block = SDXL_DEFAULTS if self.sdxl is None else self.sdxl
        sdxl_config = config_files.frozen(SDXLConfig, sdxl_block, "config.sdxl", error=ConfigError)
        object.__setattr__(self, "sdxl", sdxl_config)
        object.__setattr__(self, "t0s", tuple(float(t0) for t0 in self.t0s))
        for name in STEP_FIELDS:
            value = self.sampler[name]
            if not (_is_int(value) and value >= 0):
                raise field_error(f"sampler.{name}", value, "an int >= 0 (0 = unset)")
        try:
            sampler_from_config(self.sampler)
        except ValueError as e:
            raise _prefixed(e, "sampler") from None
        for t0 in self.t0s:
            self.input_config(t0)
        output = config_files.frozen(OutputConfig, self.output, "config.output", error=ConfigError)
        object.__setattr__(self, "output", output)

    def input_config(
        self,
        t0: float,
        sde: SDE | None = None,
        model_size: int | None = None,
        text: guide_inputs.TextInputs | None = None,
        micro: guide_inputs.micro.MicroInputs | None = None,
    ) -> guide_inputs.GuideInputConfig:
        """The guide input config of the sub-job at ``t0`` (raises :class:`ConfigError`).

        With the model's ``sde``, per-example t0s must lie in its ``(eps, T]``;
        ``input.image_size`` None means the model's ``model_size`` (before the model
        is loaded any size stands in, to check the other fields); ``text``: the
        rows' text defaults when the model takes prompts (:func:`text_inputs`);
        ``micro``: their micro-conditioning when it is an SDXL model (:func:`micro_inputs`).
        """
        domain = {} if sde is None else {"time_domain": (float(sde.eps), float(sde.T))}
        block = dict(self.input.to_dict() if hasattr(self.input, "to_dict") else self.input)
        size = block["image_size"]
        size = (model_size or 1) if size is None else size
        try:
            return guide_inputs.GuideInputConfig.from_mapping(
                dict(
                    block,
                    image_size=size,
                    t0=float(t0),
                    seed=self.seed,
                    text=text,
                    micro=micro,
                    **domain,
                )
            )
        except (ValueError, TypeError) as e:
            raise _prefixed(e, "input") from None


@functools.cache
def _default_config() -> ml_collections.ConfigDict:
    return config_files.load_config("configs/default.py")


def check_config(config: ml_collections.ConfigDict) -> JobConfig:
    """The job's :class:`JobConfig`, every field checked before any work (:class:`ConfigError`).

    A key that ``configs/default.py`` (which lists every field) lacks is refused.
    """
    unknown = config_files.first_unknown(
        config, _default_config(), moved=guide_inputs.moved_fields("input")
    )
    if unknown:
        raise ConfigError(unknown)
    return config_files.frozen(JobConfig, {k: config[k] for k in config.keys()}, "config")


def load_model(model_dir: str, sharding: Any = None) -> pretrained.LoadedModel:
    """The job's model (a converted latent folder's weights placed with ``sharding`` as
    they are read); a folder that does not load is a :class:`ConfigError`."""
    try:
        model = pretrained.load_model(model_dir, sharding=sharding)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"config.model_dir: cannot load {model_dir!r}: {' '.join(str(e).split())}"
        ) from None
    return model


def takes_micro_conditioning(model: Any) -> bool:
    """Whether ``model`` is an SDXL model (it takes ``config.sdxl``'s micro-conditioning)."""
    return isinstance(model, sdxl.SDXLModel)


def takes_text(model: Any) -> bool:
    """Whether ``model`` takes prompts (a latent text-to-image model: it tokenizes text)."""
    return callable(getattr(model, "tokenize_with_flags", None))


def micro_inputs(
    config: JobConfig, model: Any, image_size: tuple[int, int]
) -> guide_inputs.micro.MicroInputs | None:
    """The rows' micro-conditioning defaults (``config.sdxl``, sizes None: ``image_size``,
    the guides') and the fields ``model`` reads; None for a model that is not SDXL."""
    if not takes_micro_conditioning(model):
        return None
    size = tuple(float(s) for s in image_size)
    values = dataclasses.asdict(config.sdxl)
    for field in ("original_size", "target_size"):
        values[field] = size if values[field] is None else tuple(map(float, values[field]))
    values["crops_coords_top_left"] = tuple(map(float, values["crops_coords_top_left"]))
    micro = guide_inputs.micro
    reads = micro.REFINER_READS if model.requires_aesthetics_score else micro.BASE_READS
    return micro.MicroInputs(values, reads)


def text_inputs(config: JobConfig, model: Any) -> guide_inputs.TextInputs | None:
    """The rows' text defaults for ``model``; None for a model that takes no text.

    A pixel model refuses every text or latent setting other than the default by
    name (it would otherwise edit without them).
    """
    if not takes_micro_conditioning(model):
        for field, default in SDXL_DEFAULTS.items():
            value = getattr(config.sdxl, field)
            if value != (tuple(default) if isinstance(default, tuple) else default):
                raise field_error(
                    f"sdxl.{field}",
                    value,
                    f"{default!r} (the default): the model in "
                    f"{model.path} is not an SDXL model, which alone takes micro-conditioning",
                )
    if takes_text(model):
        scale = config.guidance_scale
        return guide_inputs.TextInputs(
            prompt=config.prompt,
            negative_prompt=config.negative_prompt,
            guidance_scale=DEFAULT_GUIDANCE_SCALE if scale is None else scale,
        )
    unused = (
        " (the default): the model in "
        f"{model.path} is a pixel model, which takes no text and has no VAE"
    )
    defaults = LatentConfig(posterior=POSTERIORS[0], mask_downsample=MASK_DOWNSAMPLES[0])
    for field, value, default in (
        ("prompt", config.prompt, None),
        ("negative_prompt", config.negative_prompt, ""),
        ("guidance_scale", config.guidance_scale, None),
        ("latent.posterior", config.latent.posterior, defaults.posterior),
        ("latent.mask_downsample", config.latent.mask_downsample, defaults.mask_downsample),
    ):
        if value != default:
            raise field_error(field, value, f"{default!r}{unused}")
    return None


def check_model(
    model: pretrained.LoadedModel, inputs: guide_inputs.GuideInputConfig, t0s: Iterable[float]
) -> None:
    """The inputs must fit the model's size and have its channels; t0s above the SDE's eps.

    A pixel model takes its own size; a latent model any size whose sides are
    multiples of its ``size_multiple`` (the VAE's factor; one size per job).
    """
    multiple = getattr(model, "size_multiple", None) if takes_text(model) else None
    if multiple is not None:
        if any(side % multiple for side in inputs.image_size):
            height, width = inputs.image_size
            raise field_error(
                "input.image_size",
                inputs.image_size,
                f"sides that are multiples of {multiple}, the size multiple of the model in "
                f"{model.path} (its VAE's factor; {height}x{width} is not); resize the guides "
                "or crop them",
            )
    elif tuple(inputs.image_size) != (model.image_size, model.image_size):
        size = (model.image_size, model.image_size)
        raise field_error(
            "input.image_size", inputs.image_size, f"{size}, the size of the model in {model.path}"
        )
    if inputs.channels != model.num_channels:
        raise field_error(
            "input.channels",
            inputs.channels,
            f"{model.num_channels}, the channels of the model in {model.path}",
        )
    if any(t0 <= model.sde.eps for t0 in t0s):
        raise field_error("t0s", tuple(t0s), f"values above the model SDE's eps={model.sde.eps}")


def device_memory(device: jax.Device) -> tuple[int, str]:
    """Bytes one device may use and where the figure comes from.

    Accelerators report their limit; CPU devices share the host's physical memory.
    """
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} device memory"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shares = max(1, jax.local_device_count())
    return host // shares, f"host memory / {shares} local devices"


def check_batch(per_device_batch: int, model: pretrained.LoadedModel) -> None:
    """The rule for ``per_device_batch``: its rows' images must fit on one device.

    ``per_device_batch * ARRAYS_PER_ROW * H * W * C * 4 bytes <= device memory`` (a
    lower bound of what a step needs, so a batch that fails it can never run; one
    that passes may still need more for the network's activations).
    """
    row = ARRAYS_PER_ROW * model.image_size**2 * model.num_channels * 4
    memory, where = device_memory(jax.local_devices()[0])
    if per_device_batch * row > memory:
        raise field_error(
            "per_device_batch",
            per_device_batch,
            f"at most {memory // row} for this model: each row holds {ARRAYS_PER_ROW} "
            f"{model.image_size}x{model.image_size}x{model.num_channels} float32 images "
            f"({row} bytes) and {where} is {memory} bytes",
        )


def build_catalog(inputs: guide_inputs.GuideInputConfig) -> guide_inputs.Catalog:
    """The input listing; a source that cannot be listed is a :class:`ConfigError`."""
    try:
        return guide_inputs.build_catalog(inputs)
    except ValueError as e:
        raise _prefixed(e, "input") from None


def check_workdir_flag(workdir: str) -> None:
    """``--workdir``: a folder that outlives the process (``ram://`` only in the Python API)."""
    if not workdir.strip():
        raise ConfigError(f"--workdir: got {workdir!r}; expected a folder (local or gs://)")
    if files.scheme(workdir) == "ram":
        raise ConfigError(
            f"--workdir: got {workdir!r}; expected a local folder or a persistent store "
            "such as gs:// (ram:// lives in memory and vanishes with this process; the "
            "Python API can use it within one process)"
        )


def check_model_folder(config: ml_collections.ConfigDict, config_path: str) -> None:
    """A missing model folder that the config file knows how to make: say how, in one line.

    The config file's optional ``missing_model(model_dir)`` gives the hint.
    """
    model_dir = config.model_dir
    if model_dir == "default" or not files.is_local(model_dir) or os.path.exists(model_dir):
        return
    module = config_files.load_module(config_path)
    hint = getattr(module, "missing_model", lambda _: None)(model_dir)
    if hint:
        raise ConfigError(f"config.model_dir: {model_dir!r} does not exist here: {hint}")
