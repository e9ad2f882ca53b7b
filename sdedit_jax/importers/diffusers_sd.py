"""Stable Diffusion 1.x/2.x components from their diffusers/transformers folders.

A pipeline folder holds ``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``)
and ``text_encoder/`` (transformers' ``CLIPTextModel``), each a ``config.json`` and
weights (safetensors or a torch ``.bin`` read by the allow-listed reader; ``fp16``
variants are widened to float32). Each config maps to this project's frozen config
(settings the ports do not implement are refused, naming the field), and each state
dict to the network's NNX state through one key and shape check, so a bad file is
reported with every missing, unexpected and mis-shaped tensor at once.

Key mapping: NNX paths are the reference's module paths with ``kernel``/``scale``/
``embedding`` leaves for ``weight``, plus the few renames of :func:`torch_key`
(``to_out.0``, ``ff.net.0.proj``/``ff.net.2``, ``downsamplers.0``/``upsamplers.0``);
convolution kernels go OIHW -> HWIO and linear ones (out, in) -> (in, out).
Text encoders saved by transformers < 5 prefix their keys with ``text_model.`` and
may hold the ``position_ids`` buffer; both layouts load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdedit_jax.importers import diffusers, fields, state_dict
from sdedit_jax.models import clip_text, sd_unet, vae
from sdedit_jax.models.architecture import UnsupportedConfig
from sdedit_jax.util import files, host_memory

CONFIG_FILE = "config.json"
TEXT_WEIGHTS = {"safetensors": "model", "bin": "pytorch_model"}
_TEXT_PREFIX = "text_model."
_TEXT_BUFFERS = ("embeddings.position_ids",)

# UNet2DConditionModel's settings the port implements at one value only, with their defaults
# first (fields a config.json leaves out take them); anything else is another network.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# Read and mapped (defaults of diffusers), or accepted without effect: ``dropout`` (inference),
# ``upcast_attention`` (attention logits are always float32), ``addition_embed_type_num_heads``
# (read only by addition embeddings other than SDXL's ``text_time``, which are refused).
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "dropout": 0.0,
    "upcast_attention": False,
    "addition_embed_type_num_heads": 64,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
_INT_OR_INTS = (
    (lambda v: fields.POSITIVE_INT[0](v) or fields.POSITIVE_INTS[0](v)),
    "an int >= 1 or a list of them",
)
_SIZE = (
    (lambda v: fields.POSITIVE_INT[0](v) or (fields.POSITIVE_INTS[0](v) and len(set(v)) == 1)),
    "an int >= 1 or a list of equal ones",
)
_UNET_RULES = {
    "sample_size": _SIZE,
    "in_channels": fields.POSITIVE_INT,
    "out_channels": fields.POSITIVE_INT,
    "flip_sin_to_cos": fields.BOOL,
    "freq_shift": fields.FINITE,
    "down_block_types": fields.STRINGS,
    "up_block_types": fields.STRINGS,
    "block_out_channels": fields.POSITIVE_INTS,
    "layers_per_block": fields.POSITIVE_INT,
    "downsample_padding": fields.NON_NEGATIVE_INT,
    "norm_num_groups": fields.POSITIVE_INT,
    "norm_eps": fields.POSITIVE,
    "cross_attention_dim": fields.POSITIVE_INT,
    "transformer_layers_per_block": _INT_OR_INTS,
    "attention_head_dim": _INT_OR_INTS,
    "use_linear_projection": fields.BOOL,
    "dropout": fields.UNIT_INTERVAL,
    "upcast_attention": ((lambda v: v is None or isinstance(v, bool)), "true, false or null"),
    "addition_embed_type": ((lambda v: v in (None, "text_time")), "null or 'text_time' (SDXL)"),
    "addition_time_embed_dim": fields.POSITIVE_INT_OR_NULL,
    "projection_class_embeddings_input_dim": fields.POSITIVE_INT_OR_NULL,
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
}
_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "mid_block_add_attention": True,
    "force_upcast": True,  # a float16 concern; this port computes in float32 or bfloat16
}
_VAE_RULES = {
    "in_channels": fields.POSITIVE_INT,
    "out_channels": fields.POSITIVE_INT,
    "down_block_types": fields.STRINGS,
    "up_block_types": fields.STRINGS,
    "block_out_channels": fields.POSITIVE_INTS,
    "layers_per_block": fields.POSITIVE_INT,
    "latent_channels": fields.POSITIVE_INT,
    "norm_num_groups": fields.POSITIVE_INT,
    "sample_size": _SIZE,
    "scaling_factor": fields.POSITIVE,
    "mid_block_add_attention": fields.BOOL,
    "force_upcast": fields.BOOL,
}
_TEXT_FIELDS = (
    "vocab_size",
    "max_position_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
)


def _with_defaults(
    config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    fixed: Mapping[str, tuple[Any, ...]],
    rules: Mapping[str, Any],
    class_name: str,
) -> dict[str, Any]:
    """``config`` over the defaults; unknown fields and unsupported values are errors."""
    name = config.get("_class_name", class_name)
    if name != class_name:
        raise UnsupportedConfig(f"_class_name: {name!r} is not a {class_name}")
    known = set(defaults) | set(fixed)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise UnsupportedConfig(f"{unknown[0]}: unknown {class_name} field")
    fields.check_values(config, rules, "")
    values = {**defaults, **{k: allowed[0] for k, allowed in fixed.items()}}
    values.update({k: v for k, v in config.items() if not k.startswith("_")})
    for field, allowed in fixed.items():
        if values[field] not in allowed:
            raise UnsupportedConfig(f"{field}: {values[field]!r} is not supported")
    return values


def _levels(field: str, value: Any, levels: int) -> tuple[int, ...]:
    values = (value,) * levels if isinstance(value, int) else tuple(value)
    if len(values) != levels:
        raise UnsupportedConfig(f"{field}: {len(values)} values for {levels} levels")
    return values


def _blocks(field: str, types: Any, known: Mapping[str, bool], levels: int) -> tuple[bool, ...]:
    unknown = [t for t in types if t not in known]
    if unknown:
        raise UnsupportedConfig(f"{field}: block type {unknown[0]!r} is not supported")
    if len(types) != levels:
        raise UnsupportedConfig(f"{field}: {len(types)} blocks, block_out_channels has {levels}")
    return tuple(known[t] for t in types)


def _side(size: Any) -> int:
    return int(size if isinstance(size, int) else size[0])


def unet_config(config: Mapping[str, Any]) -> sd_unet.SDUNetConfig:
    """From a diffusers ``UNet2DConditionModel`` config.json (its ``attention_head_dim``
    holds head counts, as diffusers reads it)."""
    cfg = _with_defaults(config, _UNET_DEFAULTS, _UNET_FIXED, _UNET_RULES, "UNet2DConditionModel")
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    levels = len(channels)
    up = _blocks("up_block_types", cfg["up_block_types"], _UP_TYPES, levels)
    return sd_unet.SDUNetConfig(
        sample_size=_side(cfg["sample_size"]),
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        block_out_channels=channels,
        down_cross_attention=_blocks(
            "down_block_types", cfg["down_block_types"], _DOWN_TYPES, levels
        ),
        up_cross_attention=tuple(reversed(up)),  # diffusers lists up blocks lowest level first
        layers_per_block=cfg["layers_per_block"],
        attention_heads=_levels("attention_head_dim", cfg["attention_head_dim"], levels),
        transformer_layers_per_block=_levels(
            "transformer_layers_per_block", cfg["transformer_layers_per_block"], levels
        ),
        cross_attention_dim=cfg["cross_attention_dim"],
        use_linear_projection=cfg["use_linear_projection"],
        norm_num_groups=cfg["norm_num_groups"],
        norm_eps=float(cfg["norm_eps"]),
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=float(cfg["freq_shift"]),
        downsample_padding=cfg["downsample_padding"],
        **_added_embedding(cfg),
    )


def _added_embedding(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """SDXL's ``text_time`` fields (none for SD 1.x/2.x), which come together."""
    kind = cfg["addition_embed_type"]
    dims = {k: cfg[k] for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim")}
    given = [k for k, v in dims.items() if v is not None]
    if kind is None:
        if given:
            raise UnsupportedConfig(f"{given[0]}: set without addition_embed_type 'text_time'")
        return {}
    missing = [k for k, v in dims.items() if v is None]
    if missing:
        raise UnsupportedConfig(f"{missing[0]}: addition_embed_type 'text_time' needs it")
    return dims


def vae_config(config: Mapping[str, Any]) -> vae.VAEConfig:
    """From a diffusers ``AutoencoderKL`` config.json."""
    cfg = _with_defaults(config, _VAE_DEFAULTS, _VAE_FIXED, _VAE_RULES, "AutoencoderKL")
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    encoder_types = {"DownEncoderBlock2D": True}
    _blocks("down_block_types", cfg["down_block_types"], encoder_types, len(channels))
    _blocks("up_block_types", cfg["up_block_types"], {"UpDecoderBlock2D": True}, len(channels))
    return vae.VAEConfig(
        sample_size=_side(cfg["sample_size"]),
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        block_out_channels=channels,
        layers_per_block=cfg["layers_per_block"],
        latent_channels=cfg["latent_channels"],
        norm_num_groups=cfg["norm_num_groups"],
        mid_attention=cfg["mid_block_add_attention"],
        scaling_factor=float(cfg["scaling_factor"]),
    )


def text_encoder_config(config: Mapping[str, Any]) -> clip_text.CLIPTextConfig:
    """From a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` config.json
    (fields that change no output, such as dropout or initialisers, are ignored)."""
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise UnsupportedConfig(f"model_type: {model_type!r} is not 'clip_text_model'")
    values = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        **{k: config[k] for k in _TEXT_FIELDS if k in config},
    }
    fields.check_dataclass_fields(clip_text.CLIPTextConfig, values, "")
    if "CLIPTextModelWithProjection" in config.get("architectures", ()):
        # SDXL's second encoder; transformers reads the pooled state at the largest id
        # when eos_token_id is 2 (the converted OpenCLIP configs), else at that token.
        eos = config.get("eos_token_id", 2)
        values["projection_dim"] = config.get("projection_dim", 512)
        values["eos_token_id"] = None if eos == 2 else eos
    return clip_text.CLIPTextConfig(**values)


# --- state dicts --------------------------------------------------------------------------


def torch_key(path: tuple[Any, ...]) -> str:
    """The reference's state-dict key of one leaf of a port's NNX state."""
    names = []
    for i, part in enumerate(path[:-1]):
        parent = path[i - 1] if i else None
        if part == "resampler":
            names.append("downsamplers.0" if "down_blocks" in path else "upsamplers.0")
        elif part == "to_out":
            names.append("to_out.0")
        elif parent == "ff" and part in ("proj", "out"):
            names.append("net.0.proj" if part == "proj" else "net.2")
        else:
            names.append(str(part))
    return ".".join([*names, "bias" if path[-1] == "bias" else "weight"])


def _torch_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] != "kernel":
        return shape
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def _from_torch(path: tuple[Any, ...], value: Any) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if path[-1] != "kernel":
        return value
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def _leaf_shapes(abstract_state: nnx.State) -> dict[tuple[Any, ...], tuple[int, ...]]:
    leaves = (tuple(leaf.shape) for leaf in jax.tree.leaves(nnx.to_pure_dict(abstract_state)))
    return dict(zip(state_dict.flat_paths(abstract_state), leaves, strict=True))


def expected_tensors(abstract_state: nnx.State) -> dict[str, tuple[int, ...]]:
    """The reference key and torch shape of every weight of a port's (abstract) state."""
    return {torch_key(p): _torch_shape(p, s) for p, s in _leaf_shapes(abstract_state).items()}


def state_from_tensors(
    source: str, tensors: Mapping[str, Any], abstract_state: nnx.State
) -> nnx.State:
    """The float32 NNX state from a reference state dict, after one check of every key."""
    state_dict.check_tensors(source, tensors, expected_tensors(abstract_state))
    return state_dict.fill_state(
        abstract_state, lambda path, _: _from_torch(path, tensors[torch_key(path)])
    )


def abstract_in(module: Any, config: Any, dtype: Any = None) -> nnx.State:
    """``module.abstract(config)``'s state, its float leaves in ``dtype`` when given."""
    abstract_state = module.abstract(config)[1]
    if dtype is None:
        return abstract_state
    return jax.tree.map(
        lambda leaf: (
            jax.ShapeDtypeStruct(leaf.shape, dtype)
            if jnp.issubdtype(leaf.dtype, jnp.floating)
            else leaf
        ),
        abstract_state,
    )


def unet_state(
    tensors: Mapping[str, Any], config: sd_unet.SDUNetConfig, source: str = "", dtype: Any = None
) -> nnx.State:
    """:class:`~sdedit_jax.models.sd_unet.SDUNet`'s state from a diffusers state dict
    (float leaves in ``dtype``, default float32)."""
    return state_from_tensors(source, tensors, abstract_in(sd_unet, config, dtype))


def vae_state(
    tensors: Mapping[str, Any], config: vae.VAEConfig, source: str = "", dtype: Any = None
) -> nnx.State:
    """:class:`~sdedit_jax.models.vae.AutoencoderKL`'s state (old attention names read too)."""
    tensors = diffusers.new_attention_names(dict(tensors))
    return state_from_tensors(source, tensors, abstract_in(vae, config, dtype))


def text_encoder_state(
    tensors: Mapping[str, Any],
    config: clip_text.CLIPTextConfig,
    source: str = "",
    dtype: Any = None,
) -> nnx.State:
    """:class:`~sdedit_jax.models.clip_text.CLIPTextEncoder`'s state, either key layout."""
    tensors = text_encoder_tensors(tensors)
    return state_from_tensors(source, tensors, abstract_in(clip_text, config, dtype))


def text_encoder_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers CLIP text model's weights in the port's names (no buffers)."""
    tensors = {k.removeprefix(_TEXT_PREFIX): v for k, v in tensors.items()}
    return {k: v for k, v in tensors.items() if k not in _TEXT_BUFFERS}


# --- component folders ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Component:
    """One imported component: its frozen config, float32 weights and weight file."""

    config: Any
    state: nnx.State
    weights: str


def _weights(folder: str, stems: Mapping[str, str], variant: str | None) -> str:
    infix = f".{variant}" if variant else ""
    names = [f"{stem}{infix}.{ext}" for ext, stem in stems.items()]
    for name in names:
        if files.exists(files.join(folder, name)):
            return files.join(folder, name)
    raise FileNotFoundError(f"{folder}: none of the weight files {tuple(names)}")


def _load(
    folder: str,
    stems: Mapping[str, str],
    variant: str | None,
    to_config: Callable[[Mapping[str, Any]], Any],
    to_state: Callable[..., nnx.State],
    dtype: Any,
) -> Component:
    config_path = files.join(folder, CONFIG_FILE)
    try:
        config = to_config(diffusers.read_json(config_path))
    except ValueError as err:
        message = str(err)
        raise type(err)(message if config_path in message else f"{config_path}: {err}") from None
    weights = _weights(folder, stems, variant)
    host_memory.map_large_blocks()
    state = to_state(diffusers.lazy_tensors(weights), config, weights, dtype)
    return Component(config=config, state=state, weights=weights)


_DIFFUSERS_STEMS = {"safetensors": "diffusion_pytorch_model", "bin": "diffusion_pytorch_model"}


def load_unet(folder: str, variant: str | None = None, dtype: Any = None) -> Component:
    """A diffusers ``unet/`` folder (``variant="fp16"`` reads ``*.fp16.safetensors``), its
    weights in ``dtype`` (default float32), read one tensor at a time."""
    return _load(folder, _DIFFUSERS_STEMS, variant, unet_config, unet_state, dtype)


def load_vae(folder: str, variant: str | None = None, dtype: Any = None) -> Component:
    """A diffusers ``vae/`` folder."""
    return _load(folder, _DIFFUSERS_STEMS, variant, vae_config, vae_state, dtype)


def load_text_encoder(folder: str, variant: str | None = None, dtype: Any = None) -> Component:
    """A transformers ``text_encoder/`` folder (``model.safetensors`` or ``pytorch_model.bin``)."""
    return _load(folder, TEXT_WEIGHTS, variant, text_encoder_config, text_encoder_state, dtype)
