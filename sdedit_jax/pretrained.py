"""Loading a trained score model from a model folder (the shipped default included).

A model folder holds ``model_info.json`` (architecture, SDE, output
parameterisation, weight checksums; written by :mod:`sdedit_jax.train`) and
``ema_params_fp32.msgpack`` or ``ema_params_bf16.msgpack``. The default model,
trained by this project on rendered emoji, ships in ``sdedit_jax/assets/default_model``.
"""

from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx

from sdedit_jax import checkpoint, files
from sdedit_jax.models import unet
from sdedit_jax.score import make_score_fn
from sdedit_jax.sde import SDE, ScoreFn, sde_from_config

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets", "default_model")
INFO_FILE = "model_info.json"
WEIGHT_FILES = ("ema_params_fp32.msgpack", "ema_params_bf16.msgpack")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A ready score function and what the job needs to know about it."""

    score_fn: ScoreFn
    sde: SDE
    image_size: int
    num_channels: int
    checksum: str  # sha256 of the weight file: recorded with every output
    path: str


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

    Returns the sha256 of each weight file written (also recorded in the info).
    """
    files.makedirs(model_dir)
    writers = {WEIGHT_FILES[0]: checkpoint.save_params_fp32}
    if with_bf16:
        writers[WEIGHT_FILES[1]] = checkpoint.save_params_bf16
    sums = {name: write(files.join(model_dir, name), state) for name, write in writers.items()}
    info = {**(extra or {}), "model": model_config, "sde": sde_config,
            "parameterization": parameterization, "sha256": sums}
    files.publish_bytes(files.join(model_dir, INFO_FILE),
                        json.dumps(info, indent=1, default=list).encode())
    return sums


def load_model(model_dir: str | None = None) -> LoadedModel:
    """Loads the EMA weights in ``model_dir`` (default: the shipped model)."""
    model_dir = DEFAULT_MODEL_DIR if model_dir in (None, "", "default") else model_dir
    info_path = files.join(model_dir, INFO_FILE)
    if not files.exists(info_path):
        raise FileNotFoundError(f"{info_path}: no model info file (is {model_dir} a model folder?)")
    info = json.loads(files.read_text(info_path))
    for field in ("model", "sde", "parameterization", "sha256"):
        if field not in info:
            raise ValueError(f"{info_path}: missing field {field!r}")
    weights = next((w for w in WEIGHT_FILES if files.exists(files.join(model_dir, w))), None)
    if weights is None:
        raise FileNotFoundError(f"{model_dir}: none of the weight files {WEIGHT_FILES}")
    config = unet.UNetConfig.from_config(info["model"])
    abstract = nnx.eval_shape(lambda: unet.build(config, 0))
    graphdef, abstract_state = nnx.split(abstract)
    path = files.join(model_dir, weights)
    state = checkpoint.load_params(path, abstract_state, sha256=info["sha256"].get(weights))
    sde = sde_from_config(info["sde"])
    return LoadedModel(
        score_fn=make_score_fn(graphdef, state, sde, info["parameterization"]),
        sde=sde,
        image_size=config.image_size,
        num_channels=config.num_channels,
        checksum=checkpoint.sha256_file(path),
        path=path,
    )
