"""diffusers ``UNet2DModel`` folders: ``config.json`` + ``diffusion_pytorch_model.*`` weights.

The config decides the network: Skip* blocks or ``time_embedding_type="fourier"``
make an NCSN++ (:mod:`.diffusers_ncsnpp` maps it), anything else must be the
DDPM U-Net (:mod:`.diffusers_ddpm`). Both attention key spellings
(``query/key/value/proj_attn`` of diffusers < 0.15 and ``to_q/to_k/to_v/to_out.0``)
are read. safetensors files are read with safetensors' numpy API, ``.bin`` files
(torch pickles) with the allow-listed reader, so no checkpoint code runs.

The training SDE comes from a ``scheduler_config.json`` beside the model (or in
the pipeline's ``scheduler/``) when there is one; otherwise DDPM's linear betas
1e-4..0.02 over 1000 steps for DDPM networks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdedit_jax.importers import diffusers_ddpm, diffusers_ncsnpp, fields, torch_checkpoint
from sdedit_jax.importers.imported import Imported
from sdedit_jax.sde import BETA_SCHEDULES
from sdedit_jax.util import files, safetensors_files

FORMAT = "diffusers"
OPTIONS = ()
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILE = "scheduler_config.json"
DDPM_SDE = {"name": "discrete_vp", "beta_start": 1e-4, "beta_end": 0.02, "num_timesteps": 1000}
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_SAMPLE_SIZE = (
    (
        lambda v: (
            fields.POSITIVE_INT[0](v)
            or (
                isinstance(v, (list, tuple)) and len(v) == 2 and all(map(fields.POSITIVE_INT[0], v))
            )
        )
    ),
    "an int >= 1 or a list of two",
)
# The type of every UNet2DModel field either network reads (checked before anything is
# built from them; which values each network supports is its own config's check).
UNET2D_RULES = {
    "sample_size": _SAMPLE_SIZE,
    "in_channels": fields.POSITIVE_INT,
    "out_channels": fields.POSITIVE_INT,
    "center_input_sample": fields.BOOL,
    "time_embedding_type": fields.STRING,
    "time_embedding_dim": fields.POSITIVE_INT_OR_NULL,
    "freq_shift": fields.FINITE,
    "flip_sin_to_cos": fields.BOOL,
    "down_block_types": fields.STRINGS,
    "mid_block_type": fields.STRING_OR_NULL,
    "up_block_types": fields.STRINGS,
    "block_out_channels": fields.POSITIVE_INTS,
    "layers_per_block": fields.POSITIVE_INT,
    "mid_block_scale_factor": fields.FINITE,
    "downsample_padding": fields.NON_NEGATIVE_INT,
    "downsample_type": fields.STRING,
    "upsample_type": fields.STRING,
    "dropout": fields.UNIT_INTERVAL,
    "act_fn": fields.STRING,
    # NCSN++ reads 0 as "one head"; the DDPM U-Net needs >= 1 (see load).
    "attention_head_dim": (
        (lambda v: v is None or fields.NON_NEGATIVE_INT[0](v)),
        "an int >= 0 or null",
    ),
    "norm_num_groups": fields.POSITIVE_INT_OR_NULL,
    "attn_norm_num_groups": fields.POSITIVE_INT_OR_NULL,
    "norm_eps": fields.POSITIVE,
    "resnet_time_scale_shift": fields.STRING,
    "add_attention": fields.BOOL,
    "class_embed_type": fields.STRING_OR_NULL,
    "num_class_embeds": fields.POSITIVE_INT_OR_NULL,
    "num_train_timesteps": fields.POSITIVE_INT_OR_NULL,
}
SCHEDULER_RULES = {
    "num_train_timesteps": ((lambda v: fields.POSITIVE_INT[0](v) and v >= 2), "an int >= 2"),
    "beta_start": fields.PROBABILITY,
    "beta_end": fields.PROBABILITY,
    "sigma_min": fields.POSITIVE,
    "sigma_max": fields.POSITIVE,
}


def detect(path: str) -> bool:
    """A folder with a ``config.json``, itself or in a pipeline's ``unet/``."""
    return files.isdir(path) and any(
        files.exists(files.join(path, *p, CONFIG_FILE)) for p in ((), ("unet",))
    )


def model_folder(path: str) -> str:
    """The folder holding ``config.json``: ``path`` itself or a pipeline's ``unet/``."""
    for folder in (path, files.join(path, "unet")):
        if files.exists(files.join(folder, CONFIG_FILE)):
            return folder
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (is it a diffusers model folder?)")


def read_json(path: str, rules: dict | None = None) -> dict:
    """A JSON object file, bounded (:func:`files.read_json_object`), each field of ``rules``
    checked; every problem is one ``ValueError`` naming the file and the field."""
    value = files.read_json_object(path)
    try:
        fields.check_values(value, rules or {}, "")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return value


def weight_file(folder: str) -> str:
    for name in WEIGHT_FILES:
        if files.exists(files.join(folder, name)):
            return files.join(folder, name)
    raise FileNotFoundError(f"{folder}: none of the weight files {WEIGHT_FILES}")


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """A flat ``{key: array}`` state dict from a safetensors or torch ``.bin`` file."""
    if path.endswith(".safetensors"):
        import safetensors.numpy

        data = files.read_bytes(path)  # a regular file, so bounded by its size
        try:
            return dict(safetensors.numpy.load(data))
        except Exception as err:  # safetensors raises its own error types for bad files
            raise torch_checkpoint.CheckpointError(
                f"{path}: not a readable safetensors file ({err})"
            ) from None
    return torch_checkpoint.state_dict_from(torch_checkpoint.read_checkpoint(path), path)


def lazy_tensors(path: str) -> Mapping[str, Any]:
    """:func:`read_tensors`, but a safetensors file's tensors are read one by one when used
    (``np.asarray(tensor)``), so a 10 GB file is never in memory at once."""
    if path.endswith(".safetensors"):
        return safetensors_files.lazy_tensors(path)
    return read_tensors(path)


def new_attention_names(tensors: dict[str, Any]) -> dict[str, Any]:
    """Renames diffusers' old attention keys (``query`` ... ``proj_attn``) to the current ones."""
    renamed = {}
    for key, value in tensors.items():
        match = _OLD_ATTENTION.match(key)
        if match:
            key = f"{match[1]}{_NEW_ATTENTION[match[2]]}.{match[3]}"
        renamed[key] = value
    return renamed


def is_ncsnpp(config: dict) -> bool:
    """NCSN++ (score_sde) networks use Skip* blocks and Fourier time features."""
    blocks = list(config.get("down_block_types", ())) + list(config.get("up_block_types", ()))
    return config.get("time_embedding_type") == "fourier" or any("Skip" in b for b in blocks)


def _scheduler_config(folder: str) -> tuple[str | None, dict]:
    for path in (
        files.join(folder, SCHEDULER_FILE),
        files.join(files.dirname(folder.rstrip("/")), "scheduler", SCHEDULER_FILE),
    ):
        if files.exists(path):
            return path, read_json(path, SCHEDULER_RULES)
    return None, {}


def ddpm_sde(folder: str) -> dict:
    """DDPM's discrete schedule, from the scheduler config when present."""
    path, sched = _scheduler_config(folder)
    if path is None:
        return dict(DDPM_SDE)
    for field, allowed in (
        ("beta_schedule", BETA_SCHEDULES),
        ("trained_betas", (None,)),
        ("prediction_type", ("epsilon",)),
    ):
        if sched.get(field, allowed[0]) not in allowed:
            raise ValueError(f"{path}: {field}: {sched[field]!r} is not supported")
    sde = {
        "name": "discrete_vp",
        "beta_start": float(sched.get("beta_start", DDPM_SDE["beta_start"])),
        "beta_end": float(sched.get("beta_end", DDPM_SDE["beta_end"])),
        "num_timesteps": int(sched.get("num_train_timesteps", DDPM_SDE["num_timesteps"])),
    }
    if sched.get("beta_schedule", "linear") != "linear":  # DDPM folders keep their old record
        sde["beta_schedule"] = sched["beta_schedule"]
    return sde


def ve_sde(folder: str) -> dict | None:
    """score_sde's VE SDE from a ``ScoreSdeVeScheduler`` config; None when there is none.

    sigma_max is per dataset (380 for LSUN church, 348 for CelebA-HQ/FFHQ 256), so
    without a scheduler config the caller must name the SDE.
    """
    path, sched = _scheduler_config(folder)
    if path is None or "sigma_max" not in sched:
        return None
    return {
        "name": "ve",
        "sigma_min": float(sched.get("sigma_min", 0.01)),
        "sigma_max": float(sched["sigma_max"]),
    }


def load(path: str) -> Imported:
    """Imports a diffusers ``UNet2DModel`` folder (see the module docstring)."""
    folder = model_folder(path)
    config_path = files.join(folder, CONFIG_FILE)
    config = read_json(config_path, UNET2D_RULES)
    try:
        if not is_ncsnpp(config) and config.get("attention_head_dim") == 0:
            raise ValueError("attention_head_dim: got 0; expected an int >= 1 or null")
        if is_ncsnpp(config):
            mapping, architecture = diffusers_ncsnpp, "ncsnpp"
        else:
            mapping, architecture = diffusers_ddpm, "ddpm_unet"
        net_config = mapping.config_from_diffusers(config)
    except (ValueError, ZeroDivisionError) as err:
        kind = type(err) if isinstance(err, ValueError) else ValueError
        raise kind(f"{config_path}: {err}") from None
    # The schedule before the weights: a bad scheduler config is refused without reading them.
    if architecture == "ncsnpp":
        data_range = "0_1" if tuple(net_config.data_range) == (0.0, 1.0) else "-1_1"
        usage = {
            "condition": "sigma",
            "parameterization": "score",
            "data_range": data_range,
            "sde": ve_sde(folder),
        }
    else:
        usage = {
            "condition": "timestep",
            "parameterization": "noise",
            "data_range": "-1_1",
            "sde": ddpm_sde(folder),
        }
    weights = weight_file(folder)
    tensors = new_attention_names(read_tensors(weights))
    try:
        state = mapping.params_from_diffusers(tensors, net_config)
    except ValueError as err:
        message = str(err)
        raise type(err)(message if weights in message else f"{weights}: {message}") from None
    return Imported(
        architecture=architecture,
        config=net_config,
        state=state,
        source={
            "path": files.abspath(weights),
            "format": FORMAT,
            "sha256": files.sha256(weights),
        },
        **usage,
    )
