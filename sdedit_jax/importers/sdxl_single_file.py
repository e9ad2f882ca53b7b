"""SDXL base and refiner single-file checkpoints in the original (Stability ``sgm``) layout.

One ``.safetensors`` (or ``.ckpt``) holds the U-Net (``model.diffusion_model.*``, its
``text_time`` embedding at ``label_emb.0.*``), the VAE (``first_stage_model.*``) and the
text encoders under ``conditioner.embedders.<i>.``: the base's CLIP ViT-L at ``0.transformer.``
(transformers' layout) and OpenCLIP ViT-bigG at ``1.model.``; the refiner has only the
OpenCLIP encoder, at ``0.model.``. OpenCLIP fuses query, key and value into one
``in_proj`` and keeps its pooled projection as ``text_projection``, transposed against
transformers' ``text_projection.weight``; unlike SD 2.x every block is read (the pooled
state comes from the last one). The base and the refiner are told apart by the keys, as
diffusers' ``from_single_file`` does.

The architecture comes from a diffusers SDXL folder's ``config.json`` files (``unet/``,
``vae/``, ``text_encoder_2/`` and, for the base, ``text_encoder/``), or is read off the
tensors' shapes (:func:`infer_configs`). Renaming reuses
:mod:`.sd_single_file`'s tables: each expected diffusers key is given its original name,
the file is checked once in those names (every missing, unexpected and mis-shaped tensor
in one error), and the components load through :mod:`.diffusers_sd`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdedit_jax.importers import diffusers, diffusers_sd, sd_single_file, state_dict
from sdedit_jax.models import clip_text, sd_unet, vae
from sdedit_jax.util import files

EMBEDDERS = "conditioner.embedders."
CLIP_PREFIX = f"{EMBEDDERS}0.transformer."
OPEN_CLIP_PREFIX = {"base": f"{EMBEDDERS}1.model.", "refiner": f"{EMBEDDERS}0.model."}
COMPONENTS = {
    "base": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "refiner": ("unet", "vae", "text_encoder_2"),
}
# Buffers and constants of sgm's modules that are not weights the networks read.
_IGNORED = {
    "denoiser.sigmas",
    f"{CLIP_PREFIX}text_model.embeddings.position_ids",
    f"{OPEN_CLIP_PREFIX['base']}logit_scale",
    f"{OPEN_CLIP_PREFIX['refiner']}logit_scale",
    *sd_single_file.EMA_BUFFERS,
}
_READERS = {
    "unet": diffusers_sd.unet_config,
    "vae": diffusers_sd.vae_config,
    "text_encoder": diffusers_sd.text_encoder_config,
    "text_encoder_2": diffusers_sd.text_encoder_config,
}
_STATES = {
    "unet": diffusers_sd.unet_state,
    "vae": diffusers_sd.vae_state,
    "text_encoder": diffusers_sd.text_encoder_state,
    "text_encoder_2": diffusers_sd.text_encoder_state,
}


def is_sdxl(tensors: Mapping[str, Any]) -> bool:
    """Whether a single file's keys are sgm's (its text encoders are ``conditioner``'s)."""
    return any(k.startswith(EMBEDDERS) for k in tensors)


def kind(tensors: Mapping[str, Any]) -> str:
    """``"refiner"`` when the first embedder is OpenCLIP's, else ``"base"``."""
    return "refiner" if any(k.startswith(OPEN_CLIP_PREFIX["refiner"]) for k in tensors) else "base"


def expected_tensors(configs: Mapping[str, Any], which: str) -> sd_single_file.Expected:
    """Every original key of a ``which`` (base or refiner) file: its component, the
    diffusers keys and shapes it holds and its own shape (:func:`.sd_single_file.expected_from`)."""
    open_clip = OPEN_CLIP_PREFIX[which]
    renames = {
        "unet": (sd_unet, lambda k: (sd_single_file.unet_key(k, configs["unet"]), 0)),
        "vae": (vae, lambda k: (sd_single_file.vae_key(k, configs["vae"]), 0)),
        "text_encoder": (clip_text, lambda k: (sd_single_file.text_key(k, CLIP_PREFIX), 0)),
        "text_encoder_2": (clip_text, lambda k: sd_single_file.open_clip_key(k, open_clip)),
    }
    return sd_single_file.expected_from(configs, {c: renames[c] for c in COMPONENTS[which]})


def split_tensors(
    source: str, tensors: Mapping[str, Any], configs: Mapping[str, Any], ema: bool = True
) -> dict[str, dict[str, Any]]:
    """Each component's diffusers state dict, after one check of every key of the file."""
    tensors = sd_single_file.normalise(tensors)
    expected = expected_tensors(configs, kind(tensors))
    return sd_single_file.split_checked(source, tensors, expected, set(_IGNORED), ema)


def configs_from(folder: str, which: str) -> dict[str, Any]:
    """The frozen configs of a ``which`` file's components from a diffusers SDXL folder."""
    configs = {}
    for component in COMPONENTS[which]:
        path = files.join(folder, component, diffusers_sd.CONFIG_FILE)
        if not files.exists(path):
            raise FileNotFoundError(
                f"{path}: missing (an SDXL {which} single file takes its architecture from "
                "the config.json of each component in config=<folder>)"
            )
        try:
            configs[component] = _READERS[component](diffusers.read_json(path))
        except ValueError as err:
            message = str(err)
            raise type(err)(message if path in message else f"{path}: {err}") from None
    if configs["text_encoder_2"].projection_dim is None:
        raise ValueError(
            f"{files.join(folder, 'text_encoder_2', diffusers_sd.CONFIG_FILE)}: SDXL needs a "
            "CLIPTextModelWithProjection"
        )
    return configs


def load(
    path: str,
    config_folder: str,
    ema: bool = True,
    tensors: Mapping[str, Any] | None = None,
    dtype: Any = None,
) -> tuple[str, dict[str, diffusers_sd.Component]]:
    """``(kind, components)`` of an SDXL single file, with the architecture of
    ``config_folder`` where it holds every component's ``config.json``, else inferred from
    the tensors (:func:`infer_configs`); ``tensors``: the file's state dict where already
    read; weights in ``dtype`` (default float32)."""
    tensors = sd_single_file.read_tensors(path) if tensors is None else tensors
    which = kind(tensors)
    has_configs = all(
        files.exists(files.join(config_folder, c, diffusers_sd.CONFIG_FILE))
        for c in COMPONENTS[which]
    )
    configs = configs_from(config_folder, which) if has_configs else infer_configs(tensors, path)
    split = split_tensors(path, tensors, configs, ema)
    return which, {
        c: diffusers_sd.Component(configs[c], _STATES[c](split[c], configs[c], path, dtype), path)
        for c in COMPONENTS[which]
    }


# --- architecture from the tensors ----------------------------------------------------------

# What the tensors do not hold, as the published SDXL folders have it.
NATIVE_PIXELS = 1024
NATIVE_LATENTS = 128  # the U-Net's: 1024 px through the published VAE's factor of 8
SCALING_FACTOR = 0.13025
TIME_IDS = {"base": 6, "refiner": 5}  # sizes, crop, then target size or aesthetic score


def infer_configs(tensors: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Every component's frozen config, read off an SDXL file's tensors: SD's inference
    (:func:`.sd_single_file.infer_unet` and the others: 64 channels per head) with the
    ``text_time`` widths, every OpenCLIP block read and the pooled projection's width;
    native size and VAE scaling are the published folders'."""
    tensors = sd_single_file.normalise(tensors)
    which = kind(tensors)
    try:
        text_2 = {
            **sd_single_file.infer_open_clip(tensors, OPEN_CLIP_PREFIX[which], unread_blocks=0),
            "architectures": ["CLIPTextModelWithProjection"],
            "projection_dim": sd_single_file.dims(
                tensors, f"{OPEN_CLIP_PREFIX[which]}text_projection"
            )[1],
        }
        configs = {
            "unet": diffusers_sd.unet_config(infer_unet(tensors, which, text_2["projection_dim"])),
            "vae": diffusers_sd.vae_config(
                {
                    **sd_single_file.infer_vae(tensors),
                    "sample_size": NATIVE_PIXELS,
                    "scaling_factor": SCALING_FACTOR,
                }
            ),
            "text_encoder_2": diffusers_sd.text_encoder_config(text_2),
        }
        if which == "base":
            configs["text_encoder"] = diffusers_sd.text_encoder_config(
                sd_single_file.infer_clip(tensors, CLIP_PREFIX)
            )
    except ValueError as err:
        raise type(err)(f"{source}: {err}" if source else str(err)) from None
    return configs


def infer_unet(tensors: Mapping[str, Any], which: str, pooled_width: int) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config.json: SD's, and the ``text_time`` embedding whose
    input is the pooled projection beside the time ids' sinusoidal features."""
    width = sd_single_file.dims(tensors, f"{sd_single_file.UNET_PREFIX}label_emb.0.0.weight")[1]
    features, rest = divmod(width - pooled_width, TIME_IDS[which])
    if rest or features <= 0:
        raise state_dict.StateDictError(
            f"{sd_single_file.UNET_PREFIX}label_emb.0.0.weight: {width} inputs are not the "
            f"pooled projection's {pooled_width} and {TIME_IDS[which]} time ids' features"
        )
    return {
        **sd_single_file.infer_unet(tensors),
        "sample_size": NATIVE_LATENTS,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": features,
        "projection_class_embeddings_input_dim": width,
    }
