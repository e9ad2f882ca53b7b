"""Score models from model folders (the shipped default included) and published checkpoints.

A model folder holds ``model_info.json`` and ``ema_params_fp32.msgpack`` (or
``ema_params_bf16.msgpack``). ``model_info.json``::

    {
      "architecture": "ddpm_unet",   # key of ARCHITECTURES; "unet" when absent
      "model": {...},                # that architecture's config fields
      "sde": {"name": "discrete_vp", ...},   # as sde.sde_from_config reads it
      "parameterization": "noise",   # "noise" | "score" | "scaled" (see score.py)
      "condition": "timestep",       # network input: "t" | "timestep" (t*T-1) | "sigma"
      "data_range": "-1_1",          # pixels the network was trained on: "-1_1" | "0_1"
                                     # (either absent where the architecture's config
                                     # decides it: Architecture.fixed_usage, e.g. "unet")
      "source": {"path": ..., "format": "diffusers", "sha256": ...},  # imported models
      "sha256": {"ema_params_fp32.msgpack": ...}
    }

Only a weight file that ``sha256`` lists is loaded, and only with that checksum; every
field is type-checked before anything is built from it (one ``ValueError`` naming
the file and the field: :mod:`sdedit_jax.importers.fields`).

Data range: every score model this module returns takes and returns images in
[-1, 1], whatever the network was trained on; a network trained on [0, 1] (score_sde's
VE models with ``centered=False``) is wrapped by :func:`sdedit_jax.score.make_score_fn`
(the one wrapper of every network), with its VE SDE rescaled to match
(:func:`sdedit_jax.score.sde_for_range`). Guides are therefore always given in [-1, 1].

:func:`load_model` and :func:`load_network` also accept a diffusers folder, a
ddim/SDEdit checkpoint or a score_sde checkpoint and convert it on the fly
(:mod:`sdedit_jax.importers`); ``python -m sdedit_jax.convert`` writes the folder once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, TypedDict, Unpack

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax import importers
from sdedit_jax.importers import fields, sd_single_file, sdxl_single_file
from sdedit_jax.latent import model as latent_model
from sdedit_jax.latent import sdxl
from sdedit_jax.models.architecture import Architecture
from sdedit_jax.models.architectures import ARCHITECTURES
from sdedit_jax.score import (
    check_condition,
    check_parameterization,
    make_score_fn,
    sde_for_range,
)
from sdedit_jax.sde import SDE, SDES, ScoreFn
from sdedit_jax.util import files, weights

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets", "default_model")
INFO_FILE = "model_info.json"
WEIGHT_FILES = ("ema_params_fp32.msgpack", "ema_params_bf16.msgpack")
# The model folder's "architecture" when absent (folders written before the field).
DEFAULT_ARCHITECTURE = "unet"
# The score-model fields besides "parameterization" (see _usage), in description order.
USAGE_FIELDS = ("condition", "data_range")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A ready score function and what the job needs to know about it."""

    score_fn: ScoreFn
    sde: SDE
    image_size: int
    num_channels: int
    checksum: str  # sha256 of the weight file: recorded with every output
    path: str
    architecture: str = DEFAULT_ARCHITECTURE
    # The network behind ``score_fn`` (``None`` for a score that is not a network, e.g. a
    # closed form): tools that run or export the network use these, not ``score_fn``'s parts.
    graphdef: nnx.GraphDef | None = None
    state: nnx.State | None = None
    parameterization: str | None = None  # what the network predicts (score.PARAMETERIZATIONS)
    # Everything that decides the network's outputs besides its weights, defaults filled
    # in (architecture, config, SDE, parameterization, conditioning input, data range):
    # a workdir's fingerprint records it (``None`` for a score that is not a network).
    description: dict | None = None

    def network(self) -> nnx.Module:
        """The network as an ``nnx.Module`` (a new object sharing this model's arrays)."""
        if self.graphdef is None:
            raise ValueError(f"{self.path}: this model has no network")
        return nnx.merge(self.graphdef, self.state)


def save_model(
    model_dir: str,
    state: nnx.State,
    model_config: dict,
    sde_config: dict,
    parameterization: str,
    extra: dict | None = None,
    with_bf16: bool = False,
) -> dict[str, str]:
    """Writes a model folder: fp32 weights (and a bf16 copy), ``model_info.json``.

    Returns the sha256 of each weight file written (also recorded in the info). A weight
    file of an earlier model in the folder that this one does not write is deleted
    before the info is, so the folder holds only what its info lists.
    """
    files.makedirs(model_dir)
    writers = {WEIGHT_FILES[0]: weights.save_params_fp32}
    if with_bf16:
        writers[WEIGHT_FILES[1]] = weights.save_params_bf16
    sums = {name: write(files.join(model_dir, name), state) for name, write in writers.items()}
    for stale in set(WEIGHT_FILES) - set(writers):
        if files.exists(files.join(model_dir, stale)):
            files.remove(files.join(model_dir, stale))
    info = {
        **(extra or {}),
        "model": model_config,
        "sde": sde_config,
        "parameterization": parameterization,
        "sha256": sums,
    }
    files.publish_bytes(
        files.join(model_dir, INFO_FILE), json.dumps(info, indent=1, default=list).encode()
    )
    return sums


def architecture(name: str) -> Architecture:
    """The :class:`~sdedit_jax.models.architecture.Architecture` of a name."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture: must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def _abstract(name: str, config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state (cached and shared: callers copy before filling it)."""
    return architecture(name).abstract(config)


@dataclasses.dataclass(frozen=True)
class _Folder:
    """A model folder's info, parsed and checked."""

    info: dict
    info_path: str
    architecture: str
    config: Any
    weights: str


_SHA256 = re.compile(r"[0-9a-f]{64}")
_INFO_RULES = {
    "model": ((lambda v: isinstance(v, dict)), "an object of the architecture's config fields"),
    "sde": ((lambda v: isinstance(v, dict)), 'an object such as {"name": "vp"}'),
    "parameterization": fields.STRING,
    "sha256": (
        (
            lambda v: (
                isinstance(v, dict)
                and bool(v)
                and all(
                    k in WEIGHT_FILES and isinstance(h, str) and _SHA256.fullmatch(h)
                    for k, h in v.items()
                )
            )
        ),
        f"an object mapping weight files {list(WEIGHT_FILES)} to 64 hex digits",
    ),
    "architecture": fields.STRING,
    "condition": fields.STRING,
    "data_range": fields.STRING,
}
# Int fields of network configs that may be 0 (every other int is a count or size).
_ZERO_OK = ("downsample_padding",)


def _network_config(name: str, values: Any, where: str) -> Any:
    """The config of architecture ``name`` from its fields, types and ranges checked first."""
    config_cls = architecture(name).config_class
    fields.check_dataclass_fields(config_cls, values, where, may_be_zero=_ZERO_OK)
    try:
        return config_cls.from_config(values)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None


def _read_folder(model_dir: str) -> _Folder:
    info_path = files.join(model_dir, INFO_FILE)
    if not files.exists(info_path):
        raise FileNotFoundError(f"{info_path}: no model info file (is {model_dir} a model folder?)")
    info = files.read_json_object(info_path)
    for field in ("model", "sde", "parameterization", "sha256"):
        if field not in info:
            raise ValueError(f"{info_path}: missing field {field!r}")
    name = info.get("architecture", DEFAULT_ARCHITECTURE)
    try:
        fields.check_values(info, _INFO_RULES, "")
        config = _network_config(name, info["model"], "model")
    except ValueError as err:
        raise ValueError(f"{info_path}: {err}") from None
    # Only a listed file, checked against its sha256: a file another model left is never read.
    listed = [w for w in WEIGHT_FILES if w in info["sha256"]]
    weights = next((w for w in listed if files.exists(files.join(model_dir, w))), None)
    if weights is None:
        raise FileNotFoundError(
            f"{model_dir}: none of the weight files {listed} that {INFO_FILE} lists"
        )
    return _Folder(info, info_path, name, config, files.join(model_dir, weights))


def _sde(config: Any, where: str) -> SDE:
    try:
        return fields.check_sde_config(config, "sde")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _usage(name: str, config: Any, recorded: dict, where: str) -> tuple[dict, tuple[str, ...]]:
    """How the network is used as a score model, and which of its fields were recorded.

    ``parameterization`` is always recorded; ``condition`` and ``data_range`` come from
    the architecture's config where it decides them (``fixed_usage``), else from the
    record (``condition`` required, ``data_range`` by default ``"-1_1"``).
    """
    fixed = architecture(name).fixed_usage(config)
    for field, value in fixed.items():
        if recorded.get(field) not in (None, value):
            raise ValueError(
                f"{where}: field {field!r} is {recorded[field]!r}, but architecture "
                f"{name!r} with this config needs {value!r}"
            )
    if "condition" not in fixed and recorded.get("condition") is None:
        raise ValueError(f"{where}: missing field 'condition'")
    usage = {
        "parameterization": recorded["parameterization"],
        "condition": fixed.get("condition", recorded.get("condition")),
        "data_range": fixed.get("data_range", recorded.get("data_range") or "-1_1"),
    }
    return usage, ("parameterization",) + tuple(f for f in USAGE_FIELDS if f not in fixed)


def _describe(name: str, config: Any, sde: SDE, usage: dict, described: tuple[str, ...]) -> dict:
    """:attr:`LoadedModel.description`: every field, defaults included, JSON-ready.

    Usage fields the config decides are left out (``config`` already holds them), so a
    workdir's fingerprint reads as it did before they had a name.
    """
    sde_name = next(k for k, cls in SDES.items() if type(sde) is cls)
    description = {
        "architecture": name,
        "config": dataclasses.asdict(config),
        "sde": {"name": sde_name, **dataclasses.asdict(sde)},
        **{k: usage[k] for k in described},
    }
    return json.loads(json.dumps(description))


def _locate(path: str | None, format: str | None) -> tuple[str, _Folder | None]:
    """The path (the shipped model by default) and, if it is a model folder, its info."""
    path = DEFAULT_MODEL_DIR if path in (None, "", "default") else path
    if format in (None, "model_folder") and importers.detect_format(path) == "model_folder":
        return path, _read_folder(path)
    return path, None


def _folder_state(folder: _Folder) -> nnx.State:
    """The folder's weights, checked against the sha256 its info records."""
    _, abstract_state = _abstract(folder.architecture, folder.config)
    sha256 = folder.info["sha256"].get(files.basename(folder.weights))
    return weights.load_params(folder.weights, abstract_state, sha256=sha256)


def _loaded(
    name: str, config: Any, state: nnx.State, sde: SDE, recorded: dict, where: str, **paths: str
) -> LoadedModel:
    """The score model of any architecture: score function and SDE in [-1, 1] units."""
    graphdef, _ = _abstract(name, config)
    usage, described = _usage(name, config, recorded, where)
    try:
        check_parameterization(usage["parameterization"])
        check_condition(usage["condition"], sde)
        user_sde = sde_for_range(sde, usage["data_range"])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    score_fn = make_score_fn(
        graphdef, state, sde, usage["parameterization"], usage["condition"], usage["data_range"]
    )
    image_size, num_channels = architecture(name).image_shape(config)
    return LoadedModel(
        score_fn=score_fn,
        sde=user_sde,
        image_size=image_size,
        num_channels=num_channels,
        architecture=name,
        graphdef=graphdef,
        state=state,
        parameterization=usage["parameterization"],
        description=_describe(name, config, sde, usage, described),
        **paths,
    )


class CheckpointOptions(TypedDict, total=False):
    """How to read a path that is not a model folder (see :func:`sdedit_jax.importers.load`).

    ``format``: the checkpoint format where detection cannot tell; ``image_size``: the
    network's image size where the checkpoint does not record it; ``score_sde_config``:
    score_sde's config file for a ``checkpoint_<n>``. Stable Diffusion
    (:mod:`sdedit_jax.latent.model`): ``config_folder``, the folder with ``tokenizer/``
    (SDXL: and/or ``tokenizer_2/``; and ``scheduler/``, component configs) of a
    single-file checkpoint, SD's or SDXL's, which makes the path one; ``variant``
    (``"fp16"``) of a diffusers folder's weight files; ``ema``: a single file's EMA
    weights where it has them (default True).
    """

    format: str | None
    image_size: int | None
    score_sde_config: str | None
    config_folder: str | None
    variant: str | None
    ema: bool


def _checked(options: dict) -> CheckpointOptions:
    unknown = sorted(set(options) - set(CheckpointOptions.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; see CheckpointOptions")
    return CheckpointOptions(**options)


def is_latent(path: str | None, options: CheckpointOptions | None = None) -> bool:
    """Whether ``path`` holds a latent text-to-image model (Stable Diffusion)."""
    if path in (None, "", "default"):
        return False
    if (options or {}).get("config_folder") is not None:
        return True
    return latent_model.is_pipeline_folder(path) or latent_model.is_converted_folder(path)


def load_latent(
    path: str,
    options: CheckpointOptions,
    compute_dtype: str | None = None,
    param_dtype: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> latent_model.LatentModel | sdxl.SDXLModel:
    """A Stable Diffusion model from any of its sources (:mod:`sdedit_jax.latent.model`;
    SDXL folders, diffusers' or converted, and sgm single files: :mod:`sdedit_jax.latent.sdxl`).
    A single file is read once, and its keys tell SD from SDXL.

    ``param_dtype``: the weights' dtype when read from a diffusers folder or a single
    file (default float32; a converted folder keeps its own); ``sharding``: where a
    converted folder's weights are placed as they are read.
    """
    if options.get("config_folder") is not None:
        tensors = sd_single_file.read_tensors(path)
        load = (
            sdxl.from_single_file
            if sdxl_single_file.is_sdxl(tensors)
            else latent_model.from_single_file
        )
        ema = options.get("ema", True)
        return load(path, options["config_folder"], ema, compute_dtype, tensors, param_dtype)
    if latent_model.is_converted_folder(path):
        if sdxl.is_converted_sdxl(path):
            return sdxl.from_converted_folder(path, compute_dtype, sharding)
        return latent_model.from_converted_folder(path, compute_dtype, sharding)
    variant = options.get("variant")
    if sdxl.is_sdxl_pipeline(path):
        return sdxl.from_pipeline(path, variant, compute_dtype, param_dtype)
    return latent_model.from_pipeline(path, variant, compute_dtype, param_dtype)


def load_model(
    model_dir: str | None = None,
    *,
    sde: dict | None = None,
    compute_dtype: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
    **options: Unpack[CheckpointOptions],
) -> LoadedModel | latent_model.LatentModel | sdxl.SDXLModel:
    """Loads a score model: the shipped one (default), a model folder, or a checkpoint.

    Args:
        model_dir: a model folder, a diffusers folder, a ddim/SDEdit ``.ckpt``/``.pth``
            or a score_sde ``checkpoint_<n>`` (the latter converted on the fly); or a
            Stable Diffusion model (a diffusers pipeline folder, a single-file checkpoint
            with ``config_folder``, or its converted folder), which loads as a
            :class:`~sdedit_jax.latent.model.LatentModel` (an SDXL base or refiner
            folder or single file: :class:`~sdedit_jax.latent.sdxl.SDXLModel`).
        sde: overrides the SDE of a checkpoint (``{"name": "ve", ...}``); needed when
            the checkpoint does not record it.
        compute_dtype: a latent model's network compute type (e.g. ``"bfloat16"``).
        sharding: where a converted latent folder's weights go as each tensor is read
            (a job passes its mesh's replicated sharding); default: the default device.
        options: see :class:`CheckpointOptions`.
    """
    options = _checked(options)
    if is_latent(model_dir, options):
        return load_latent(model_dir, options, compute_dtype, sharding=sharding)
    if compute_dtype is not None:
        raise ValueError("compute_dtype: only latent models take it here; see load_network")
    model_dir, folder = _locate(model_dir, options.get("format"))
    if folder is None:
        return _load_imported(model_dir, sde, options)
    model_sde = _sde(sde if sde is not None else folder.info["sde"], folder.info_path)
    return _loaded(
        folder.architecture,
        folder.config,
        _folder_state(folder),
        model_sde,
        folder.info,
        folder.info_path,
        checksum=files.sha256(folder.weights),
        path=folder.weights,
    )


def _import(path: str, options: CheckpointOptions) -> importers.Imported:
    return importers.load(
        path,
        format=options.get("format"),
        image_size=options.get("image_size"),
        config=options.get("score_sde_config"),
    )


def _imported_sde(imported: importers.Imported, sde: dict | None, path: str) -> dict:
    chosen = sde if sde is not None else imported.sde
    if chosen is None:
        raise ValueError(
            f"{path}: the checkpoint does not record its SDE; name it "
            '(e.g. sde={"name": "ve", "sigma_min": 0.01, "sigma_max": 380})'
        )
    return dict(chosen)


def _load_imported(path: str, sde: dict | None, options: CheckpointOptions) -> LoadedModel:
    imported = _import(path, options)
    model_sde = _sde(_imported_sde(imported, sde, path), path)
    recorded = {
        "condition": imported.condition,
        "parameterization": imported.parameterization,
        "data_range": imported.data_range,
    }
    return _loaded(
        imported.architecture,
        imported.config,
        imported.state,
        model_sde,
        recorded,
        path,
        checksum=imported.source["sha256"],
        path=imported.source["path"],
    )


def save_imported(
    model_dir: str, imported: importers.Imported, sde: dict | None = None, with_bf16: bool = False
) -> dict[str, str]:
    """Writes an imported checkpoint as a model folder (see the module docstring).

    Everything is checked (SDE, conditioning input, data range) before a file is written.
    """
    sde = _imported_sde(imported, sde, imported.source["path"])
    try:
        model_sde = fields.check_sde_config(sde, "sde")
        check_condition(imported.condition, model_sde)
        sde_for_range(model_sde, imported.data_range)
        check_parameterization(imported.parameterization)
    except ValueError as err:
        raise ValueError(f"{imported.source['path']}: {err}") from None
    extra = {
        "architecture": imported.architecture,
        "condition": imported.condition,
        "data_range": imported.data_range,
        "source": imported.source,
    }
    return save_model(
        model_dir,
        imported.state,
        dataclasses.asdict(imported.config),
        sde,
        imported.parameterization,
        extra=extra,
        with_bf16=with_bf16,
    )


# --- the bare network -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _apply(
    graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, t: jax.Array, cond: Any
) -> jax.Array:
    """One jitted call of a bare network (graph static, weights traced): tools and parity tests."""
    return nnx.merge(graphdef, state)(x, t, cond)


@dataclasses.dataclass(frozen=True)
class Network:
    """A loaded network as a function: ``net(x[B,H,W,C], t, cond=None) -> [B,H,W,C]``.

    The architecture's own call (:mod:`sdedit_jax.models.architecture`), jitted, in eval
    mode. ``t`` is the network's own time input (a scalar or ``[B]``): DDPM's timestep
    (0..T-1, float allowed) for ``ddpm_unet`` and ``sd_unet``, sigma for ``ncsnpp``,
    the diffusion time t (or sigma, by its config) for ``unet``. ``cond`` is the
    per-example conditioning pytree of a conditional network (``None`` for the others):
    ``sd_unet``'s text encoder states ``h`` (``{"text": h}``, or ``h`` itself), so
    ``load_network(sd_folder)(z, t, h)`` is ``UNet2DConditionModel(z, t, h).sample``; an
    SDXL U-Net also takes ``added_cond={"text_embeds": pooled, "time_ids": ids}``.
    For the pixel networks the output equals diffusers' ``UNet2DModel(x_nchw, t).sample``
    transposed to NHWC.
    """

    architecture: str
    config: Any
    graphdef: nnx.GraphDef
    state: nnx.State

    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array | float,
        cond: Any = None,
        added_cond: dict[str, Any] | None = None,
    ) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), x.shape[:1])
        if added_cond is not None:  # SDXL: diffusers' added_cond_kwargs beside the text states
            cond = {"text": cond, **added_cond}
        return _apply(self.graphdef, self.state, x, t, cond)


def load_network(
    path: str | None = None,
    *,
    compute_dtype: str | None = None,
    **options: Unpack[CheckpointOptions],
) -> Network:
    """The bare network of a model folder, diffusers folder or checkpoint (see :class:`Network`).

    Args:
        compute_dtype: e.g. ``"bfloat16"`` for accelerators (architectures whose
            config has a ``compute_dtype`` field); default: as stored (float32).
        options: see :class:`CheckpointOptions`.
    """
    options = _checked(options)
    if is_latent(path, options):
        unet = load_latent(path, options).unet
        config = unet.config
        if compute_dtype is not None:
            config = dataclasses.replace(config, compute_dtype=compute_dtype)
        return Network("sd_unet", config, _abstract("sd_unet", config)[0], unet.state)
    path, folder = _locate(path, options.get("format"))
    if folder is not None:
        name, config, state = folder.architecture, folder.config, _folder_state(folder)
    else:
        imported = _import(path, options)
        name, config, state = imported.architecture, imported.config, imported.state
    if compute_dtype is not None:
        if not hasattr(config, "compute_dtype"):
            raise ValueError(f"compute_dtype: architecture {name!r} has no compute_dtype option")
        config = dataclasses.replace(config, compute_dtype=compute_dtype)
    graphdef, _ = _abstract(name, config)
    return Network(name, config, graphdef, state)
