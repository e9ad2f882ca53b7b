"""A latent text-to-image model (Stable Diffusion 1.x / 2.x): load it, save it, use it.

Three sources load to the same :class:`LatentModel`:

* a diffusers pipeline folder: ``model_index.json`` + ``unet/ vae/ text_encoder/
  tokenizer/ scheduler/`` (safetensors or ``.bin``; ``variant="fp16"`` reads the half
  files, widened to float32);
* a single-file checkpoint in the original layout (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.*``; ``.safetensors`` or ``.ckpt``; SDXL's
  ``conditioner.*`` files: :mod:`.sdxl`), with
  ``config=`` a folder holding ``tokenizer/`` (a file carries none), ``scheduler/`` and,
  optionally, the components' ``config.json`` (else the architecture is read off the
  tensors);
* this project's converted folder (:func:`save_folder`, ``python -m sdedit_jax.convert``):
  ``model_info.json`` with a ``latent`` record, one safetensors file per component
  (``unet.safetensors`` ..., float32 or, converted with ``--bf16``, bfloat16; folders of
  earlier versions hold ``*_fp32.msgpack`` files and still load) and the tokenizer's
  files, every file pinned by its sha256.

Weights are read one tensor at a time into their final dtype (``param_dtype``; a
converted folder's own) and placement, and written the same way, so loading or
converting a model holds no second copy of it (:mod:`sdedit_jax.util.safetensors_files`).

The schedule is the scheduler config's (``scaled_linear`` 0.00085..0.012 over 1000 steps
when there is none) as a :class:`~sdedit_jax.sde.DiscreteVPSDE`; ``prediction_type``
``epsilon`` is the ``noise`` parameterisation, ``v_prediction`` ``velocity``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sdedit_jax.importers import diffusers, diffusers_sd, fields, sd_single_file
from sdedit_jax.latent import tokenizer as clip_tokenizer
from sdedit_jax.latent.codec import VAECodec, check_options
from sdedit_jax.latent.guidance import GuidedScore
from sdedit_jax.models import clip_text, sd_unet, vae
from sdedit_jax.score import make_score_fn
from sdedit_jax.sde import BETA_SCHEDULES, DiscreteVPSDE, sde_from_config
from sdedit_jax.util import files, weights

MODEL_INDEX = "model_index.json"
INFO_FILE = "model_info.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCHEDULER_FILE = "scheduler_config.json"
NETWORKS = ("unet", "vae", "text_encoder")  # each saved as <name>.safetensors
# What folders written before the safetensors files hold (read, never written).
MSGPACK_WEIGHT_FILES = {
    "unet": "ema_params_fp32.msgpack",
    "vae": "vae_fp32.msgpack",
    "text_encoder": "text_encoder_fp32.msgpack",
    "text_encoder_2": "text_encoder_2_fp32.msgpack",
}
TOKENIZER_FILES = (
    clip_tokenizer.VOCAB_FILE,
    clip_tokenizer.MERGES_FILE,
    clip_tokenizer.TOKENIZER_FILE,
    *clip_tokenizer.CONFIG_FILES,
)
PREDICTION_TYPES = {"epsilon": "noise", "v_prediction": "velocity"}
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SD_SCHEDULE_NAME = "scaled_linear"


@functools.partial(jax.jit, static_argnums=0)
def _text_states(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(ids)


@jax.jit
def _encode(codec: VAECodec, x: jax.Array) -> jax.Array:
    return codec.encode(None, x)


@jax.jit
def _decode(codec: VAECodec, z: jax.Array) -> jax.Array:
    return codec.decode(z)


@dataclasses.dataclass(frozen=True)
class Part:
    """One network of the model: its frozen config and weights (float32, or the dtype
    they were loaded in)."""

    config: Any
    state: nnx.State


class LatentMethods:
    """What every latent model does alike with its ``unet``, ``vae``, ``sde``,
    ``parameterization`` and ``scaling_factor`` (SD here, SDXL in :mod:`.sdxl`)."""

    @functools.cached_property
    def score_fn(self) -> GuidedScore:
        graphdef, _ = sd_unet.abstract(self.unet.config)
        conditional = make_score_fn(
            graphdef, self.unet.state, self.sde, self.parameterization, "timestep"
        )
        return GuidedScore(conditional)

    @property
    def size_multiple(self) -> int:
        """Pixels per latent cell: guides must be a multiple of it on each side."""
        return self.vae.config.size_multiple

    @property
    def image_size(self) -> int:
        """The native pixel size: the U-Net's sample size times the VAE's factor."""
        return self.unet.config.sample_size * self.size_multiple

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @functools.cached_property
    def codec(self) -> VAECodec:
        """The VAE as the edit's codec: posterior mean, max-pooled masks."""
        return self.codec_with()

    def codec_with(self, posterior: str = "mean", mask_downsample: str = "max_pool") -> VAECodec:
        """The codec with other options (see :class:`~.codec.VAECodec`)."""
        check_options(posterior, mask_downsample)
        graphdef, _ = vae.abstract(self.vae.config)
        return VAECodec(
            self.vae.state,
            graphdef,
            self.scaling_factor,
            self.size_multiple,
            posterior,
            mask_downsample,
        )

    def encode(self, x: Any) -> jax.Array:
        """Images ``[B, H, W, 3]`` in [-1, 1] to scaled latents (the posterior mean)."""
        return _encode(self.codec_with(), np.asarray(x, np.float32))

    def decode(self, z: Any) -> jax.Array:
        """Scaled latents to images (about [-1, 1], not clipped)."""
        return _decode(self.codec_with(), np.asarray(z, np.float32))


@dataclasses.dataclass(frozen=True)
class LatentModel(LatentMethods):
    """A Stable Diffusion model as the edit uses it (see the module docstring).

    ``score_fn(z, t, cond)`` is the guided score of latents (:mod:`.guidance`'s
    ``cond``), ``sde`` its schedule, ``codec`` the VAE; ``tokenize``/``encode_text`` make
    the text states of ``cond``, ``encode``/``decode`` map images in [-1, 1] to scaled
    latents and back.
    """

    unet: Part
    vae: Part
    text_encoder: Part
    tokenizer: clip_tokenizer.CLIPTokenizer
    sde: DiscreteVPSDE
    parameterization: str
    scaling_factor: float
    path: str
    source: dict
    tokenizer_folder: str
    tokenizer_sha256: dict

    architecture = "sd_unet"
    num_channels = 3

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """``int32 [B, 77]`` ids, padded and truncated as transformers' CLIPTokenizer does."""
        return self.tokenizer(texts)

    def tokenize_with_flags(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids and, per text, whether it was longer than the tokenizer's length."""
        return self.tokenizer.encode(texts)

    def encode_text(self, ids: Any) -> jax.Array:
        """``[B, 77, D]`` text-encoder states (the pipelines' ``prompt_embeds``)."""
        graphdef, _ = clip_text.abstract(self.text_encoder.config)
        return _text_states(graphdef, self.text_encoder.state, np.asarray(ids, np.int32))

    @functools.cached_property
    def checksum(self) -> str:
        """One sha256 over every file the model was read from (recorded with outputs)."""
        return _digest({"source": self.source["sha256"], "tokenizer": self.tokenizer_sha256})

    @functools.cached_property
    def description(self) -> dict:
        """Everything that decides the model's outputs besides weights, JSON-ready."""
        sde = {"name": "discrete_vp", **dataclasses.asdict(self.sde)}
        return json.loads(
            json.dumps(
                {
                    "architecture": "stable_diffusion",
                    "unet": dataclasses.asdict(self.unet.config),
                    "vae": dataclasses.asdict(self.vae.config),
                    "text_encoder": dataclasses.asdict(self.text_encoder.config),
                    "tokenizer_max_length": self.tokenizer.max_length,
                    "sde": sde,
                    "parameterization": self.parameterization,
                    "scaling_factor": self.scaling_factor,
                    "source_sha256": self.source["sha256"],
                }
            )
        )


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# --- the schedule ---------------------------------------------------------------------------


def schedule(path: str | None) -> tuple[dict, str]:
    """``(sde config, parameterization)`` from a scheduler config (SD's defaults without)."""
    sched = {} if path is None else diffusers.read_json(path)
    where = path or "scheduler"
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"{where}: prediction_type: {prediction!r} is not one of {sorted(PREDICTION_TYPES)}"
        )
    name = sched.get("beta_schedule", SD_SCHEDULE_NAME)
    if name not in BETA_SCHEDULES or sched.get("trained_betas") is not None:
        raise ValueError(f"{where}: beta_schedule: {name!r} is not one of {BETA_SCHEDULES}")
    values = {k: sched.get(k, v) for k, v in SD_SCHEDULE.items()}
    for key, value in values.items():
        ok = isinstance(value, int) if key == "num_train_timesteps" else isinstance(value, float)
        if isinstance(value, bool) or not ok:
            raise ValueError(f"{where}: {key}: expected a number, got {value!r}")
    sde = {
        "name": "discrete_vp",
        "beta_start": float(values["beta_start"]),
        "beta_end": float(values["beta_end"]),
        "num_timesteps": int(values["num_train_timesteps"]),
        "beta_schedule": name,
    }
    try:
        sde_from_config(sde)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    return sde, PREDICTION_TYPES[prediction]


def _scheduler_file(folder: str) -> str | None:
    path = files.join(folder, "scheduler", SCHEDULER_FILE)
    return path if files.exists(path) else None


# --- sources --------------------------------------------------------------------------------


def is_pipeline_folder(path: str) -> bool:
    """A diffusers Stable Diffusion folder: ``model_index.json`` naming a U-Net and a VAE."""
    index = files.join(path, MODEL_INDEX)
    if not (files.isdir(path) and files.exists(index)):
        return False
    return {"unet", "vae"} <= set(files.read_json_object(index))


def is_converted_folder(path: str) -> bool:
    """This project's model folder of a latent model (its info has a ``latent`` record)."""
    info = files.join(path, INFO_FILE)
    return files.isdir(path) and files.exists(info) and "latent" in files.read_json_object(info)


def _pipeline_index(folder: str) -> None:
    """Every component the pipeline needs, present; one line naming the first that is not."""
    index = files.read_json_object(files.join(folder, MODEL_INDEX))
    for component in COMPONENTS:
        where = files.join(folder, component)
        if component not in index:
            raise ValueError(f"{files.join(folder, MODEL_INDEX)}: names no {component!r}")
        if not files.isdir(where):
            raise FileNotFoundError(f"{where}: missing ({MODEL_INDEX} names it)")


def _tokenizer(folder: str) -> tuple[clip_tokenizer.CLIPTokenizer, dict]:
    names = [n for n in TOKENIZER_FILES if files.exists(files.join(folder, n))]
    sums = {n: files.sha256(files.join(folder, n)) for n in names}
    return clip_tokenizer.CLIPTokenizer.from_folder(folder), sums


def _with_dtype(config: Any, compute_dtype: str | None) -> Any:
    return (
        config
        if compute_dtype is None
        else dataclasses.replace(config, compute_dtype=compute_dtype)
    )


def _model(
    parts: dict[str, diffusers_sd.Component | Part],
    tokenizer_folder: str,
    scheduler: str | None,
    scaling_factor: float,
    path: str,
    source: dict,
    compute_dtype: str | None,
) -> LatentModel:
    sde, parameterization = schedule(scheduler)
    tokenizer, token_sums = _tokenizer(tokenizer_folder)
    positions = parts["text_encoder"].config.max_position_embeddings
    if tokenizer.max_length > positions:
        raise ValueError(
            f"{tokenizer_folder}: model_max_length: {tokenizer.max_length} tokens, but the "
            f"text encoder has {positions} positions"
        )
    built = {
        name: Part(_with_dtype(parts[name].config, compute_dtype), parts[name].state)
        for name in ("unet", "vae", "text_encoder")
    }
    return LatentModel(
        **built,
        tokenizer=tokenizer,
        sde=sde_from_config(sde),
        parameterization=parameterization,
        scaling_factor=float(scaling_factor),
        path=path,
        source=source,
        tokenizer_folder=tokenizer_folder,
        tokenizer_sha256=token_sums,
    )


def _vae_scaling(folder: str) -> float:
    value = diffusers.read_json(files.join(folder, diffusers_sd.CONFIG_FILE)).get(
        "scaling_factor", 0.18215
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{folder}/config.json: scaling_factor: expected > 0, got {value!r}")
    return float(value)


def from_pipeline(
    folder: str,
    variant: str | None = None,
    compute_dtype: str | None = None,
    param_dtype: str | None = None,
) -> LatentModel:
    """A diffusers pipeline folder (see the module docstring); weights in ``param_dtype``
    (default float32)."""
    _pipeline_index(folder)
    parts = {
        "unet": diffusers_sd.load_unet(files.join(folder, "unet"), variant, param_dtype),
        "vae": diffusers_sd.load_vae(files.join(folder, "vae"), variant, param_dtype),
        "text_encoder": diffusers_sd.load_text_encoder(
            files.join(folder, "text_encoder"), variant, param_dtype
        ),
    }
    sums = {name: files.sha256(part.weights) for name, part in parts.items()}
    source = {"path": folder, "format": "diffusers", "sha256": _digest(sums)}
    return _model(
        parts,
        files.join(folder, "tokenizer"),
        _scheduler_file(folder),
        _vae_scaling(files.join(folder, "vae")),
        folder,
        source,
        compute_dtype,
    )


def from_single_file(
    path: str,
    config: str | None,
    ema: bool = True,
    compute_dtype: str | None = None,
    tensors: dict | None = None,
    param_dtype: str | None = None,
) -> LatentModel:
    """A single-file checkpoint with ``config``, a folder holding at least ``tokenizer/``
    (``tensors``: the file's state dict where already read), weights in ``param_dtype``."""
    if config is None:
        raise ValueError(
            f"{path}: a single-file checkpoint carries no tokenizer; pass config=<a folder "
            "with tokenizer/ (and scheduler/), e.g. the model's diffusers folder>"
        )
    has_configs = all(
        files.exists(files.join(config, c, diffusers_sd.CONFIG_FILE))
        for c in sd_single_file.COMPONENTS
    )
    parts = sd_single_file.load(path, config if has_configs else None, ema, tensors, param_dtype)
    vae_folder = files.join(config, "vae")
    scaling = (
        _vae_scaling(vae_folder)
        if files.exists(files.join(vae_folder, diffusers_sd.CONFIG_FILE))
        else 0.18215
    )
    source = {"path": path, "format": "sd_single_file", "sha256": files.sha256(path)}
    return _model(
        parts,
        files.join(config, "tokenizer"),
        _scheduler_file(config),
        scaling,
        path,
        source,
        compute_dtype,
    )


# --- the converted folder -------------------------------------------------------------------


def save_folder(folder: str, model: LatentModel) -> dict:
    """Writes ``model`` as a converted folder (see the module docstring), its weights in
    their dtype, one tensor at a time; returns its info."""
    files.makedirs(folder)
    save_tokenizer(folder, "tokenizer", model.tokenizer_folder, model.tokenizer_sha256)
    sums = save_weights(folder, {name: getattr(model, name) for name in NETWORKS})
    info = {
        "architecture": "sd_unet",
        "model": dataclasses.asdict(_with_dtype(model.unet.config, "float32")),
        "sde": {"name": "discrete_vp", **dataclasses.asdict(model.sde)},
        "parameterization": model.parameterization,
        "condition": "timestep",
        "latent": {
            "vae": dataclasses.asdict(_with_dtype(model.vae.config, "float32")),
            "text_encoder": dataclasses.asdict(_with_dtype(model.text_encoder.config, "float32")),
            "scaling_factor": model.scaling_factor,
            "image_size": model.image_size,
            "size_multiple": model.size_multiple,
            "tokenizer_sha256": model.tokenizer_sha256,
        },
        "source": model.source,
        "sha256": sums,
    }
    files.publish_bytes(files.join(folder, INFO_FILE), json.dumps(info, indent=1).encode())
    return info


def _config(config_class: type, values: Any, where: str) -> Any:
    """A network config recorded by :func:`save_folder`, types checked before it is built."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object of {config_class.__name__} fields")
    fields.check_dataclass_fields(config_class, values, where, may_be_zero=("downsample_padding",))
    try:
        return config_class.from_config(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What every converted latent folder records besides its networks (checked)."""

    info_path: str
    info: dict
    latent: dict
    sde: DiscreteVPSDE
    parameterization: str
    source: dict


def read_recorded(folder: str) -> Recorded:
    """``model_info.json`` of a converted folder: its latent record, schedule and source."""
    info_path = files.join(folder, INFO_FILE)
    info = files.read_json_object(info_path)
    latent = info.get("latent")
    if not isinstance(latent, dict):
        raise ValueError(f"{info_path}: latent: expected an object")
    try:
        sde = sde_from_config(info.get("sde"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{info_path}: sde: {err}") from None
    if info.get("parameterization") not in PREDICTION_TYPES.values():
        raise ValueError(
            f"{info_path}: parameterization: {info.get('parameterization')!r} is not one of "
            f"{sorted(PREDICTION_TYPES.values())}"
        )
    source = info.get("source")
    if not (isinstance(source, dict) and isinstance(source.get("sha256"), str)):
        raise ValueError(f"{info_path}: source: expected an object with a sha256")
    return Recorded(info_path, info, latent, sde, info["parameterization"], source)


def recorded_config(recorded: Recorded, config_class: type, values: Any, where: str) -> Any:
    """A network config of the record (:func:`_config`), the error naming the info file."""
    try:
        return _config(config_class, values, where)
    except ValueError as err:
        raise ValueError(f"{recorded.info_path}: {err}") from None


def save_weights(folder: str, parts: dict[str, Part]) -> dict[str, str]:
    """Each part's ``<name>.safetensors`` in ``folder``; returns ``{file: sha256}``."""
    return {
        f"{name}.safetensors": weights.save_state(
            files.join(folder, f"{name}.safetensors"), part.state
        )
        for name, part in parts.items()
    }


def recorded_part(
    folder: str,
    recorded: Recorded,
    name: str,
    module: Any,
    config: Any,
    sharding: jax.sharding.Sharding | None = None,
) -> Part:
    """One network's weights, read against the sha256 the record lists for its file
    (``<name>.safetensors``, or the msgpack file of an earlier version's folder)."""
    sums = recorded.info.get("sha256") or {}
    candidates = [f"{name}.safetensors", MSGPACK_WEIGHT_FILES[name]]
    weight_file = next((c for c in candidates if c in sums), None)
    if weight_file is None:
        raise ValueError(f"{recorded.info_path}: sha256: lists neither of {candidates}")
    path, abstract_state = files.join(folder, weight_file), module.abstract(config)[1]
    if weight_file.endswith(".safetensors"):
        state = weights.load_state(path, abstract_state, sums[weight_file], sharding)
    else:
        state = weights.load_params(path, abstract_state, sums[weight_file])
    return Part(config, state)


def recorded_tokenizer(
    folder: str, name: str, expected: Any
) -> tuple[clip_tokenizer.CLIPTokenizer, str, dict]:
    """``(tokenizer, its folder, its files' sha256)``, the files as the record lists them."""
    token_folder = files.join(folder, name)
    tokenizer, token_sums = _tokenizer(token_folder)
    if token_sums != expected:
        raise ValueError(f"{token_folder}: files differ from the sha256 that {INFO_FILE} records")
    return tokenizer, token_folder, token_sums


def save_tokenizer(folder: str, name: str, source_folder: str, sums: dict) -> None:
    """Copies a tokenizer's recorded files into ``folder/name``."""
    files.makedirs(files.join(folder, name))
    for file_name in sums:
        data = files.read_bytes(files.join(source_folder, file_name))
        files.publish_bytes(files.join(folder, name, file_name), data)


def from_converted_folder(
    folder: str,
    compute_dtype: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> LatentModel:
    """A folder :func:`save_folder` wrote, every file checked against its sha256, the
    weights in their stored dtype placed with ``sharding`` (default: the default device)."""
    recorded = read_recorded(folder)
    latent = recorded.latent
    configs = {
        "unet": recorded_config(
            recorded, sd_unet.SDUNetConfig, recorded.info.get("model"), "model"
        ),
        "vae": recorded_config(recorded, vae.VAEConfig, latent.get("vae"), "latent.vae"),
        "text_encoder": recorded_config(
            recorded, clip_text.CLIPTextConfig, latent.get("text_encoder"), "latent.text_encoder"
        ),
    }
    modules = {"unet": sd_unet, "vae": vae, "text_encoder": clip_text}
    parts = {
        name: recorded_part(folder, recorded, name, modules[name], config, sharding)
        for name, config in configs.items()
    }
    tokenizer, token_folder, token_sums = recorded_tokenizer(
        folder, "tokenizer", latent.get("tokenizer_sha256")
    )
    return LatentModel(
        **{n: Part(_with_dtype(p.config, compute_dtype), p.state) for n, p in parts.items()},
        tokenizer=tokenizer,
        sde=recorded.sde,
        parameterization=recorded.parameterization,
        scaling_factor=float(latent.get("scaling_factor", 0.18215)),
        path=folder,
        source=recorded.source,
        tokenizer_folder=token_folder,
        tokenizer_sha256=token_sums,
    )
