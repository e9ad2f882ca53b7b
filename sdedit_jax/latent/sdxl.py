"""SDXL base and refiner as latent models: two CLIP text encoders and micro-conditioning.

A diffusers SDXL folder (``model_index.json`` naming ``text_encoder_2``), or Stability's
single file (:func:`from_single_file`) with such a folder's tokenizers, holds the U-Net
with the ``text_time`` embedding, the VAE, ``text_encoder_2``/``tokenizer_2`` (OpenCLIP
ViT-bigG with its pooled projection) and, for the base only, ``text_encoder``/
``tokenizer`` (CLIP ViT-L). As diffusers' SDXL pipelines do, the U-Net's text states
are the penultimate hidden states of each encoder, concatenated, and its added
conditioning is the second encoder's pooled projection with the ``time_ids`` of
:mod:`.micro_conditioning` (``requires_aesthetics_score``: the refiner's 5 values).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdedit_jax.importers import diffusers_sd, sdxl_single_file
from sdedit_jax.latent import micro_conditioning
from sdedit_jax.latent import model as latent_model
from sdedit_jax.latent import tokenizer as clip_tokenizer
from sdedit_jax.models import clip_text, sd_unet, vae
from sdedit_jax.util import files

# The text encoders in the order their states are concatenated (the refiner has the second).
TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
DEFAULT_AESTHETIC_SCORE = 6.0  # the pipelines' defaults (the negative half: 2.5)
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5


def is_sdxl_pipeline(folder: str) -> bool:
    """A diffusers pipeline folder whose ``model_index.json`` names ``text_encoder_2``."""
    index = files.read_json_object(files.join(folder, latent_model.MODEL_INDEX))
    return _named(index.get("text_encoder_2"))


def _named(entry: Any) -> bool:
    """Whether a ``model_index.json`` entry names a component (``[null, null]`` does not)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


@functools.partial(jax.jit, static_argnums=(0, 2))
def _encoded(graphdef: nnx.GraphDef, state: nnx.State, skip: int, ids: jax.Array):
    return nnx.merge(graphdef, state).encode(ids, skip)


@dataclasses.dataclass(frozen=True)
class TextTower:
    """One text encoder with its tokenizer (and the files the tokenizer was read from)."""

    part: latent_model.Part
    tokenizer: clip_tokenizer.CLIPTokenizer
    tokenizer_folder: str
    tokenizer_sha256: dict


@dataclasses.dataclass(frozen=True)
class SDXLModel(latent_model.LatentMethods):
    """An SDXL base or refiner model (see the module docstring and ``LatentModel``).

    ``tokenize`` gives each tower's ids (a dict by encoder name), ``encode_text`` the
    U-Net's text states and the pooled projection, ``time_ids`` the micro-conditioning;
    ``condition`` puts them into the network's ``cond``.
    """

    unet: latent_model.Part
    vae: latent_model.Part
    towers: dict[str, TextTower]
    sde: Any
    parameterization: str
    scaling_factor: float
    path: str
    source: dict
    requires_aesthetics_score: bool
    force_zeros_for_empty_prompt: bool

    architecture = "sd_unet"
    num_channels = 3

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Each tower's ``int32 [B, L]`` ids, as its own ``CLIPTokenizer`` pads and cuts."""
        return {name: tower.tokenizer(texts) for name, tower in self.towers.items()}

    def tokenize_with_flags(self, texts: Sequence[str]) -> tuple[dict, np.ndarray]:
        """The ids and, per text, whether any tokenizer cut it."""
        encoded = {name: tower.tokenizer.encode(texts) for name, tower in self.towers.items()}
        flags = np.any([cut for _, cut in encoded.values()], axis=0)
        return {name: ids for name, (ids, _) in encoded.items()}, flags

    def encode_text(self, ids: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        """``(h [B, L, sum of widths], pooled [B, P])``: ``encode_prompt``'s ``[0]`` and
        ``[2]`` (penultimate states of each tower, the last tower's pooled projection)."""
        states, pooled = [], None
        for name, tower in self.towers.items():
            graphdef, _ = clip_text.abstract(tower.part.config)
            hidden, pooled = _encoded(
                graphdef, tower.part.state, 1, jnp.asarray(ids[name], jnp.int32)
            )
            states.append(hidden)
        return jnp.concatenate(states, axis=-1), pooled

    def time_ids(
        self,
        original_size: Any,
        crops_coords_top_left: Any = (0, 0),
        target_size: Any = None,
        aesthetic_score: Any = DEFAULT_AESTHETIC_SCORE,
    ) -> np.ndarray:
        """``[B, 6]`` (base: target size, default the original) or ``[B, 5]`` (refiner:
        the aesthetic score) micro-conditioning, as the pipeline's ``_get_add_time_ids``."""
        if self.requires_aesthetics_score:
            return micro_conditioning.time_ids(
                original_size, crops_coords_top_left, aesthetic_score=aesthetic_score
            )
        target = original_size if target_size is None else target_size
        return micro_conditioning.time_ids(original_size, crops_coords_top_left, target)

    @staticmethod
    def condition(text: Any, pooled: Any, time_ids: Any) -> dict[str, Any]:
        """The U-Net's ``cond`` (one half of :func:`~.guidance.text_condition`)."""
        return {"text": text, "text_embeds": pooled, "time_ids": time_ids}

    @functools.cached_property
    def checksum(self) -> str:
        """One sha256 over every file the model was read from."""
        tokens = {name: t.tokenizer_sha256 for name, t in self.towers.items()}
        return latent_model._digest({"source": self.source["sha256"], "tokenizers": tokens})

    @functools.cached_property
    def description(self) -> dict:
        """Everything that decides the model's outputs besides weights, JSON-ready."""
        return {
            "architecture": "stable_diffusion_xl",
            "unet": dataclasses.asdict(self.unet.config),
            "vae": dataclasses.asdict(self.vae.config),
            "text_encoders": {n: dataclasses.asdict(t.part.config) for n, t in self.towers.items()},
            "tokenizer_max_length": {n: t.tokenizer.max_length for n, t in self.towers.items()},
            "sde": {"name": "discrete_vp", **dataclasses.asdict(self.sde)},
            "parameterization": self.parameterization,
            "scaling_factor": self.scaling_factor,
            "requires_aesthetics_score": self.requires_aesthetics_score,
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            "source_sha256": self.source["sha256"],
        }


# The pipelines' flags where a model_index.json does not set them (their own defaults),
# and, for a single file without one, the published base and refiner folders'.
PIPELINE_FLAGS = {"requires_aesthetics_score": False, "force_zeros_for_empty_prompt": True}
PUBLISHED_FLAGS = {
    "base": PIPELINE_FLAGS,
    "refiner": {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False},
}


def _flags(index: dict, where: str, defaults: dict = PIPELINE_FLAGS) -> dict[str, bool]:
    """The pipeline flags of a ``model_index.json`` object (read from ``where``)."""
    flags = {}
    for name, default in defaults.items():
        flags[name] = index.get(name, default)
        if not isinstance(flags[name], bool):
            raise ValueError(f"{where}: {name}: expected true or false, got {flags[name]!r}")
    return flags


def _tower(part: diffusers_sd.Component, token_folder: str, compute_dtype: str | None) -> TextTower:
    tokenizer, token_sums = latent_model._tokenizer(token_folder)
    config = latent_model._with_dtype(part.config, compute_dtype)
    return TextTower(latent_model.Part(config, part.state), tokenizer, token_folder, token_sums)


def _model(
    parts: dict[str, diffusers_sd.Component],
    folder: str,
    source: dict,
    flags: dict[str, bool],
    compute_dtype: str | None,
) -> SDXLModel:
    """The model of the components ``parts`` with the tokenizers and scheduler of
    ``folder`` and the pipeline ``flags`` (:func:`_flags`)."""
    towers = {
        name: _tower(parts[name], files.join(folder, tokenizer_name), compute_dtype)
        for name, tokenizer_name in TEXT_ENCODERS.items()
        if name in parts
    }
    if (
        "text_encoder_2" not in towers
        or towers["text_encoder_2"].part.config.projection_dim is None
    ):
        raise ValueError(f"{folder}/text_encoder_2: SDXL needs a CLIPTextModelWithProjection")
    sde, parameterization = latent_model.schedule(latent_model._scheduler_file(folder))
    unet, vae_part = parts["unet"], parts["vae"]
    return SDXLModel(
        unet=latent_model.Part(latent_model._with_dtype(unet.config, compute_dtype), unet.state),
        vae=latent_model.Part(
            latent_model._with_dtype(vae_part.config, compute_dtype), vae_part.state
        ),
        towers=towers,
        sde=latent_model.sde_from_config(sde),
        parameterization=parameterization,
        scaling_factor=vae_part.config.scaling_factor,
        path=source["path"],
        source=source,
        **flags,
    )


def from_pipeline(
    folder: str,
    variant: str | None = None,
    compute_dtype: str | None = None,
    param_dtype: str | None = None,
) -> SDXLModel:
    """A diffusers SDXL base or refiner folder (see the module docstring); weights in
    ``param_dtype`` (default float32), read one tensor at a time."""
    index_path = files.join(folder, latent_model.MODEL_INDEX)
    index = files.read_json_object(index_path)
    names = ["unet", "vae", "scheduler"] + [
        n for pair in TEXT_ENCODERS.items() for n in pair if _named(index.get(pair[0]))
    ]
    for name in names:
        if not files.isdir(files.join(folder, name)):
            raise FileNotFoundError(f"{files.join(folder, name)}: missing ({index_path} names it)")
    parts = {"unet": diffusers_sd.load_unet(files.join(folder, "unet"), variant, param_dtype)}
    if parts["unet"].config.addition_time_embed_dim is None:
        raise ValueError(f"{folder}/unet: an SDXL U-Net has addition_embed_type 'text_time'")
    parts["vae"] = diffusers_sd.load_vae(files.join(folder, "vae"), variant, param_dtype)
    for name in TEXT_ENCODERS:
        if _named(index.get(name)):
            folder_of = files.join(folder, name)
            parts[name] = diffusers_sd.load_text_encoder(folder_of, variant, param_dtype)
    sums = {name: files.sha256(part.weights) for name, part in parts.items()}
    source = {"path": folder, "format": "diffusers", "sha256": latent_model._digest(sums)}
    return _model(parts, folder, source, _flags(index, index_path), compute_dtype)


def from_single_file(
    path: str,
    config: str,
    ema: bool = True,
    compute_dtype: str | None = None,
    tensors: dict | None = None,
    param_dtype: str | None = None,
) -> SDXLModel:
    """An SDXL base or refiner single file in sgm's layout
    (:mod:`~sdedit_jax.importers.sdxl_single_file`), with ``config`` a diffusers SDXL
    folder, or any folder with its ``tokenizer/`` (base) and ``tokenizer_2/`` (and,
    optionally, ``scheduler/``, the components' ``config.json`` and ``model_index.json``,
    whose flags default to the published folders'); weights in ``param_dtype``."""
    which, parts = sdxl_single_file.load(path, config, ema, tensors, param_dtype)
    index_path = files.join(config, latent_model.MODEL_INDEX)
    index = files.read_json_object(index_path) if files.exists(index_path) else {}
    flags = _flags(index, index_path, PUBLISHED_FLAGS[which])
    source = {"path": path, "format": "sdxl_single_file", "sha256": files.sha256(path)}
    return _model(parts, config, source, flags, compute_dtype)


# --- the converted folder -------------------------------------------------------------------

KIND = "sdxl"


def is_converted_sdxl(folder: str) -> bool:
    """A converted latent folder of an SDXL model (its latent record says ``kind: sdxl``)."""
    info = files.read_json_object(files.join(folder, latent_model.INFO_FILE))
    return isinstance(info.get("latent"), dict) and info["latent"].get("kind") == KIND


def save_folder(folder: str, model: SDXLModel) -> dict:
    """Writes ``model`` as a converted folder (``python -m sdedit_jax.convert``), its
    weights in their dtype, one tensor at a time."""
    files.makedirs(folder)
    parts = {"unet": model.unet, "vae": model.vae}
    parts.update({name: tower.part for name, tower in model.towers.items()})
    sums = latent_model.save_weights(folder, parts)
    for name, tower in model.towers.items():
        latent_model.save_tokenizer(
            folder, TEXT_ENCODERS[name], tower.tokenizer_folder, tower.tokenizer_sha256
        )

    def config(part: latent_model.Part) -> dict:
        return dataclasses.asdict(latent_model._with_dtype(part.config, "float32"))

    info = {
        "architecture": "sd_unet",
        "model": config(model.unet),
        "sde": {"name": "discrete_vp", **dataclasses.asdict(model.sde)},
        "parameterization": model.parameterization,
        "condition": "timestep",
        "latent": {
            "kind": KIND,
            "vae": config(model.vae),
            "text_encoders": {name: config(t.part) for name, t in model.towers.items()},
            "scaling_factor": model.scaling_factor,
            "image_size": model.image_size,
            "size_multiple": model.size_multiple,
            "tokenizers_sha256": {n: t.tokenizer_sha256 for n, t in model.towers.items()},
            "requires_aesthetics_score": model.requires_aesthetics_score,
            "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
        },
        "source": model.source,
        "sha256": sums,
    }
    text = json.dumps(info, indent=1).encode()
    files.publish_bytes(files.join(folder, latent_model.INFO_FILE), text)
    return info


def from_converted_folder(
    folder: str,
    compute_dtype: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> SDXLModel:
    """A folder :func:`save_folder` wrote, every file checked against its sha256, the
    weights in their stored dtype placed with ``sharding`` (default: the default device)."""
    recorded = latent_model.read_recorded(folder)
    latent = recorded.latent
    encoders = latent.get("text_encoders")
    tokens = latent.get("tokenizers_sha256")
    if not (isinstance(encoders, dict) and encoders and set(encoders) <= set(TEXT_ENCODERS)):
        raise ValueError(
            f"{recorded.info_path}: latent.text_encoders: expected an object with "
            f"{' and/or '.join(TEXT_ENCODERS)}"
        )
    if not (isinstance(tokens, dict) and set(tokens) == set(encoders)):
        raise ValueError(f"{recorded.info_path}: latent.tokenizers_sha256: one per text encoder")
    for flag in ("requires_aesthetics_score", "force_zeros_for_empty_prompt"):
        if not isinstance(latent.get(flag), bool):
            raise ValueError(f"{recorded.info_path}: latent.{flag}: expected true or false")

    def part(name: str, module: Any, config_class: type, values: Any, where: str):
        config = latent_model.recorded_config(recorded, config_class, values, where)
        loaded = latent_model.recorded_part(folder, recorded, name, module, config, sharding)
        return latent_model.Part(latent_model._with_dtype(config, compute_dtype), loaded.state)

    unet = part("unet", sd_unet, sd_unet.SDUNetConfig, recorded.info.get("model"), "model")
    vae_part = part("vae", vae, vae.VAEConfig, latent.get("vae"), "latent.vae")
    towers = {}
    for name in TEXT_ENCODERS:  # in the order of their states
        if name not in encoders:
            continue
        where = f"latent.text_encoders.{name}"
        tower_part = part(name, clip_text, clip_text.CLIPTextConfig, encoders[name], where)
        tokenizer, token_folder, token_sums = latent_model.recorded_tokenizer(
            folder, TEXT_ENCODERS[name], tokens[name]
        )
        towers[name] = TextTower(tower_part, tokenizer, token_folder, token_sums)
    return SDXLModel(
        unet=unet,
        vae=vae_part,
        towers=towers,
        sde=recorded.sde,
        parameterization=recorded.parameterization,
        scaling_factor=float(latent.get("scaling_factor", 0.13025)),
        path=folder,
        source=recorded.source,
        requires_aesthetics_score=latent["requires_aesthetics_score"],
        force_zeros_for_empty_prompt=latent["force_zeros_for_empty_prompt"],
    )
