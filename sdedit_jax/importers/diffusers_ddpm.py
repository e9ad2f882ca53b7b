"""diffusers' ``UNet2DModel`` config and weights -> :mod:`sdedit_jax.models.ddpm_unet`.

The network's module tree mirrors diffusers' names, so this mapping only renames
leaves (``resampler`` -> ``downsamplers.0`` ...) and transposes kernels (torch's
OIHW and (out, in) to HWIO and (in, out)). The ddim importer renames its keys
to these first, so both formats share one check and one fill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from sdedit_jax.importers import state_dict
from sdedit_jax.models import ddpm_unet
from sdedit_jax.models.architecture import UnsupportedConfig
from sdedit_jax.models.ddpm_unet import DDPMUNetConfig

# UNet2DModel's defaults, used for fields a diffusers config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Fields this port implements only at one value (anything else is a different network).
_DIFFUSERS_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "attn_norm_num_groups": (None,),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


def config_from_diffusers(config: Mapping[str, Any]) -> DDPMUNetConfig:
    """From a diffusers ``UNet2DModel`` config.json; unsupported settings are errors."""
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise UnsupportedConfig(f"_class_name: {class_name!r} is not supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise UnsupportedConfig(f"{unknown[0]}: unknown UNet2DModel field")
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, allowed in _DIFFUSERS_FIXED.items():
        if cfg[field] not in allowed:
            raise UnsupportedConfig(f"{field}: {cfg[field]!r} is not supported")
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    if cfg["time_embedding_dim"] not in (None, 4 * channels[0]):
        raise UnsupportedConfig(
            f"time_embedding_dim: {cfg['time_embedding_dim']!r} is not supported"
        )
    down = tuple(
        _block_attention("down_block_types", b, _DOWN_TYPES) for b in cfg["down_block_types"]
    )
    up = tuple(_block_attention("up_block_types", b, _UP_TYPES) for b in cfg["up_block_types"])
    if not (len(down) == len(up) == len(channels)):
        raise UnsupportedConfig(
            f"block_out_channels: {len(channels)} levels but {len(down)} down and "
            f"{len(up)} up blocks"
        )
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise UnsupportedConfig(f"sample_size: {size!r} is not square")
        size = size[0]
    if not isinstance(size, int):
        raise UnsupportedConfig(f"sample_size: {size!r} is not an int")
    return DDPMUNetConfig(
        image_size=size,
        in_channels=int(cfg["in_channels"]),
        out_channels=int(cfg["out_channels"]),
        block_out_channels=channels,
        layers_per_block=int(cfg["layers_per_block"]),
        down_attention=down,
        up_attention=tuple(reversed(up)),  # diffusers lists up blocks lowest level first
        mid_attention=bool(cfg["add_attention"]),
        attention_head_dim=cfg["attention_head_dim"],
        norm_num_groups=int(cfg["norm_num_groups"]),
        norm_eps=float(cfg["norm_eps"]),
        flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
        freq_shift=float(cfg["freq_shift"]),
        downsample_padding=int(cfg["downsample_padding"]),
        resamp_with_conv=True,
    )


def _block_attention(field: str, block_type: Any, types: dict[str, bool]) -> bool:
    if block_type not in types:
        raise UnsupportedConfig(f"{field}: block type {block_type!r} is not supported")
    return types[block_type]


def _torch_key(path: tuple[Any, ...]) -> str:
    """diffusers' name of one leaf of the network's state."""
    names = []
    for part in path[:-1]:
        if part == "resampler":
            names.append("downsamplers.0" if path[0] == "down_blocks" else "upsamplers.0")
        elif part == "to_out":
            names.append("to_out.0")
        else:
            names.append(str(part))
    return ".".join([*names, "bias" if path[-1] == "bias" else "weight"])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))  # (in, out) -> (out, in); vectors unchanged


def _from_torch(value: Any) -> Any:
    value = np.asarray(value, np.float32)
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def expected_diffusers_tensors(config: DDPMUNetConfig) -> dict[str, tuple[int, ...]]:
    """The diffusers state-dict key and torch shape of every weight, from the config alone."""
    _, abstract_state = ddpm_unet.abstract(config)
    shapes = dict(
        zip(
            state_dict.flat_paths(abstract_state),
            (leaf.shape for leaf in jax.tree.leaves(nnx.to_pure_dict(abstract_state))),
            strict=True,
        )
    )
    return {_torch_key(p): _torch_shape(s) for p, s in shapes.items()}


def params_from_diffusers(tensors: Mapping[str, Any], config: DDPMUNetConfig) -> nnx.State:
    """The DDPM U-Net's state from a diffusers ``UNet2DModel`` state dict.

    ``tensors`` must use the current attention names (``to_q``/``to_k``/``to_v``/
    ``to_out.0``); every key is checked (see :func:`state_dict.check_tensors`).
    """
    state_dict.check_tensors("", tensors, expected_diffusers_tensors(config))
    return state_dict.fill_state(
        ddpm_unet.abstract(config)[1], lambda path, _: _from_torch(tensors[_torch_key(path)])
    )
