"""ermongroup/ddim and SDEdit checkpoints (``.ckpt``/``.pth``) of the DDPM U-Net.

What such a file may hold (torch zip or legacy format, read by the allow-listed
reader of :mod:`sdedit_jax.importers.torch_pickle`, so no pickled code runs):

* a plain state dict (SDEdit's published ``church_outdoor.ckpt``/``celeba_hq.ckpt``);
* the same with DataParallel's ``module.`` prefix;
* ddim's training list ``[state_dict, optimizer, epoch, step(, ema_shadow)]``:
  the EMA weights are taken when present (those are what ddim samples with).

The weights do not record the training resolution; it only sets ``image_size``
(the network is fully convolutional) and defaults to 256. Everything else
(channels, levels, blocks, attention levels) is read off the tensors.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdedit_jax.importers import diffusers_ddpm, torch_pickle
from sdedit_jax.importers.imported import Imported
from sdedit_jax.models.architecture import UnsupportedConfig
from sdedit_jax.models.ddpm_unet import DDPMUNetConfig
from sdedit_jax.util import files

FORMAT = "ddim"
OPTIONS = ("image_size",)
CheckpointError = torch_pickle.CheckpointError
DEFAULT_IMAGE_SIZE = 256
DDPM_SDE = {"name": "discrete_vp", "beta_start": 1e-4, "beta_end": 0.02, "num_timesteps": 1000}

_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_FIXED = {
    "temb.dense.0": "time_embedding.linear_1",
    "temb.dense.1": "time_embedding.linear_2",
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}
_LEVEL_KEY = re.compile(r"^(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$")
_RESAMPLE_KEY = re.compile(r"^(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$")
_MID_ATTN_KEY = re.compile(r"^mid\.attn_1\.(\w+)\.(weight|bias)$")
_MID_BLOCK_KEY = re.compile(r"^mid\.block_([12])\.(\w+)\.(weight|bias)$")
# pickle protocol 2, LONG1 of 10 bytes: how torch's legacy format starts (its magic number).
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a"
_ZIP_HEAD = b"PK\x03\x04"
# Keys of ddim's ``model:`` section that do not change the network.
_DDIM_IGNORED = ("var_type", "ema_rate", "ema")


def detect(path: str) -> bool:
    """A torch file: a zip archive or torch's legacy pickle (read from the file's head)."""
    if files.isdir(path):
        return False
    with files.open_file(path, "rb") as f:  # refuses a FIFO or device without blocking
        head = f.read(4)
        f.seek(0)
        return head in (_ZIP_HEAD, _LEGACY_TORCH_HEAD) or zipfile.is_zipfile(f)


def config_from_ddim(model: Mapping[str, Any], image_size: int | None = None) -> DDPMUNetConfig:
    """From the ``model:`` section of a ddim/SDEdit yaml config and ``data.image_size``
    (or a ``resolution`` entry in ``model``)."""
    required = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")
    optional = ("type", "in_channels", "out_ch", "dropout", "resamp_with_conv", "resolution")
    unknown = sorted(set(model) - set(required) - set(optional) - set(_DDIM_IGNORED))
    if unknown:
        raise UnsupportedConfig(f"{unknown[0]}: unknown ddim model field")
    missing = [k for k in required if k not in model]
    if missing:
        raise UnsupportedConfig(f"{missing[0]}: missing from the ddim model config")
    if model.get("type", "simple") != "simple":
        raise UnsupportedConfig(f"type: {model['type']!r} is not supported (only 'simple')")
    image_size = model.get("resolution") if image_size is None else image_size
    if not isinstance(image_size, int):
        raise UnsupportedConfig(f"resolution: {image_size!r} is not an int image size")
    ch, mult = int(model["ch"]), tuple(int(m) for m in model["ch_mult"])
    sizes = [image_size // 2**level for level in range(len(mult))]
    attention = tuple(s in set(model["attn_resolutions"]) for s in sizes)
    return DDPMUNetConfig(
        image_size=int(image_size),
        in_channels=int(model.get("in_channels", 3)),
        out_channels=int(model.get("out_ch", 3)),
        block_out_channels=tuple(ch * m for m in mult),
        layers_per_block=int(model["num_res_blocks"]),
        down_attention=attention,
        up_attention=attention,
        resamp_with_conv=bool(model.get("resamp_with_conv", True)),
    )


def read_checkpoint(path: str) -> Any:
    """Unpickles a torch file safely; any malformation is one :class:`CheckpointError`."""
    with files.open_file(path, "rb") as f:
        is_zip_entry = f.read(4) == _ZIP_HEAD
        f.seek(0)
        is_zip = zipfile.is_zipfile(f)
    if is_zip_entry and not is_zip:
        raise CheckpointError(f"{path}: truncated or corrupt torch zip file (no central directory)")
    try:
        return torch_pickle.load_checkpoint(path)
    except (CheckpointError, files.NotRegularFile):
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        struct.error,
        OSError,
        KeyError,
        ValueError,
        IndexError,
    ) as err:
        raise CheckpointError(f"{path}: truncated or corrupt torch file ({err})") from None


def state_dict_from(obj: Any, path: str) -> dict[str, np.ndarray]:
    """Checks that an unpickled object is a flat ``{name: array}`` dict."""
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise CheckpointError(f"{path}: entries that are not named tensors: {bad}")
    return obj


def select_weights(obj: Any, path: str) -> tuple[dict[str, np.ndarray], str]:
    """The network weights in a ddim/SDEdit checkpoint, and which entry they came from."""
    if isinstance(obj, (list, tuple)):
        if len(obj) >= 5 and isinstance(obj[4], dict):
            entry, weights = "ema_shadow", obj[4]
        elif len(obj) >= 1 and isinstance(obj[0], dict):
            entry, weights = "state_dict", obj[0]
        else:
            raise CheckpointError(f"{path}: a list that is not ddim's [state_dict, ...]")
    else:
        entry, weights = "state_dict", obj
    weights = state_dict_from(weights, path)
    if all(k.startswith("module.") for k in weights):
        weights = {k[len("module.") :]: v for k, v in weights.items()}
    return weights, entry


def infer_config(tensors: dict[str, np.ndarray], image_size: int, path: str) -> DDPMUNetConfig:
    """The network's hyper-parameters, read off the shapes of ddim's tensors."""
    if any(k.startswith("down_blocks.") for k in tensors):
        raise CheckpointError(
            f"{path}: holds diffusers' key names; convert the diffusers folder "
            "(with its config.json) instead of the weight file"
        )
    for key in ("conv_in.weight", "conv_out.weight", "down.0.block.0.conv1.weight"):
        if key not in tensors or np.ndim(tensors[key]) != 4:
            raise CheckpointError(f"{path}: no 4-d {key}; not a ddim/SDEdit DDPM checkpoint")
    levels = 1 + max(int(m[1]) for k in tensors if (m := re.match(r"down\.(\d+)\.", k)))
    channels, attention, up_attention = [], [], []
    for level in range(levels):
        key = f"down.{level}.block.0.conv1.weight"
        if key not in tensors:
            raise CheckpointError(f"{path}: {key} is missing")
        channels.append(int(tensors[key].shape[0]))
        attention.append(any(k.startswith(f"down.{level}.attn.") for k in tensors))
        up_attention.append(any(k.startswith(f"up.{level}.attn.") for k in tensors))
    blocks = {int(m[1]) for k in tensors if (m := re.match(r"down\.0\.block\.(\d+)\.", k))}
    try:
        return DDPMUNetConfig(
            image_size=image_size,
            in_channels=int(tensors["conv_in.weight"].shape[1]),
            out_channels=int(tensors["conv_out.weight"].shape[0]),
            block_out_channels=tuple(channels),
            layers_per_block=len(blocks),
            down_attention=tuple(attention),
            up_attention=tuple(up_attention),
            resamp_with_conv=levels == 1 or "down.0.downsample.conv.weight" in tensors,
        )
    except ValueError as err:
        raise type(err)(f"{path}: {err}") from None


def to_diffusers_names(tensors: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
    """ddim's keys renamed to diffusers' (1x1-conv attention kernels become matrices).

    Keys that fit no rule keep their name, so the check reports them as unexpected.
    """
    renamed = {}
    for key, value in tensors.items():
        new = _rename(key, levels)
        if (
            new is not None
            and ".to_" in new
            and new.endswith("weight")
            and value.ndim == 4
            and value.shape[2:] == (1, 1)
        ):
            value = value[:, :, 0, 0]
        renamed[key if new is None else new] = value
    return renamed


def _rename(key: str, levels: int) -> str | None:
    prefix, _, leaf = key.rpartition(".")
    if prefix in _FIXED:
        return f"{_FIXED[prefix]}.{leaf}"
    if match := _LEVEL_KEY.match(key):
        side, level, kind, index, part, leaf = match.groups()
        block = f"{side}_blocks.{_block_index(side, int(level), levels)}"
        parts = _RESNET_PARTS if kind == "block" else _ATTN_PARTS
        group = "resnets" if kind == "block" else "attentions"
        return f"{block}.{group}.{index}.{parts[part]}.{leaf}" if part in parts else None
    if match := _RESAMPLE_KEY.match(key):
        side, level, kind, leaf = match.groups()
        sampler = "downsamplers" if kind == "downsample" else "upsamplers"
        return f"{side}_blocks.{_block_index(side, int(level), levels)}.{sampler}.0.conv.{leaf}"
    if match := _MID_BLOCK_KEY.match(key):
        index, part, leaf = match.groups()
        if part in _RESNET_PARTS:
            return f"mid_block.resnets.{int(index) - 1}.{_RESNET_PARTS[part]}.{leaf}"
        return None
    if match := _MID_ATTN_KEY.match(key):
        part, leaf = match.groups()
        return f"mid_block.attentions.0.{_ATTN_PARTS[part]}.{leaf}" if part in _ATTN_PARTS else None
    return None


def _block_index(side: str, level: int, levels: int) -> int:
    # ddim indexes up blocks by resolution level; diffusers lists them lowest level first.
    return level if side == "down" else levels - 1 - level


def load(path: str, image_size: int | None = None) -> Imported:
    """Imports a ddim/SDEdit checkpoint file (see the module docstring)."""
    weights, entry = select_weights(read_checkpoint(path), path)
    config = infer_config(weights, image_size or DEFAULT_IMAGE_SIZE, path)
    tensors = to_diffusers_names(weights, len(config.block_out_channels))
    try:
        state = diffusers_ddpm.params_from_diffusers(tensors, config)
    except ValueError as err:
        raise type(err)(f"{path}: {err} (keys in diffusers' names)") from None
    return Imported(
        architecture="ddpm_unet",
        config=config,
        state=state,
        condition="timestep",
        parameterization="noise",
        data_range="-1_1",
        sde=dict(DDPM_SDE),
        source={
            "path": files.abspath(path),
            "format": FORMAT,
            "entry": entry,
            "sha256": files.sha256(path),
        },
    )
