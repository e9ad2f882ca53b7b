"""Importing published diffusion checkpoints (at the boundary) into the project's networks.

Formats (``detect_format`` tells them apart from the files themselves):

* ``"diffusers"``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``
  or ``.bin`` (or a pipeline folder with such a ``unet/``): :mod:`.diffusers`.
* ``"ddim"``: an ermongroup/ddim or SDEdit ``.ckpt``/``.pth`` torch file: :mod:`.torch_checkpoint`.
* ``"score_sde"``: a score_sde Flax checkpoint (msgpack ``checkpoint_<n>``): :mod:`.score_sde`.
* ``"model_folder"``: this project's own model folder (read by :mod:`sdedit_jax.pretrained`).

Every importer returns an :class:`Imported`: the network (architecture name,
config, weights) and what is needed to use it as a score model, or raises one
``ValueError`` naming the file and the problem. Nothing here executes code
from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import zipfile
from typing import Any

from flax import nnx

from sdedit_jax import files

FORMATS = ("diffusers", "ddim", "score_sde", "model_folder")
CONDITIONS = ("t", "timestep", "sigma")
DATA_RANGES = {"-1_1": (-1.0, 1.0), "0_1": (0.0, 1.0)}

# pickle protocol 2, LONG1 of 10 bytes: how torch's legacy format starts (its magic number).
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a"
_ZIP_HEAD = b"PK\x03\x04"
_SCORE_SDE_NAME = re.compile(r"checkpoint_\d+$")


class UnknownFormat(ValueError):
    """The path is not a checkpoint format this project reads."""


@dataclasses.dataclass(frozen=True)
class Imported:
    """A network read from a foreign checkpoint, with how to use it as a score model.

    Attributes:
        architecture: a key of :data:`sdedit_jax.pretrained.ARCHITECTURES`.
        config: that architecture's frozen config.
        state: the network's weights (``nnx.State``, float32).
        condition: the network's conditioning input: ``"t"`` (diffusion time),
            ``"timestep"`` (DDPM's ``t * T - 1``) or ``"sigma"`` (noise std).
        parameterization: ``"noise"``, ``"score"`` or ``"scaled"`` (see :mod:`sdedit_jax.score`).
        data_range: pixel range the network was trained on, a key of :data:`DATA_RANGES`.
        sde: the SDE it was trained with, as ``sde_from_config`` reads it; ``None``
            when the checkpoint does not record it (the user must then name it).
        source: ``{"path", "format", "sha256"}`` of the file the weights came from.
    """

    architecture: str
    config: Any
    state: nnx.State
    condition: str
    parameterization: str
    data_range: str
    sde: dict | None
    source: dict


def detect_format(path: str) -> str:
    """The format of ``path`` (one of :data:`FORMATS`), from its contents (any file system)."""
    if files.isdir(path):
        if files.exists(files.join(path, "model_info.json")):
            return "model_folder"
        if any(files.exists(files.join(path, *p, "config.json")) for p in ((), ("unet",))):
            return "diffusers"
        if any(_SCORE_SDE_NAME.match(name.rstrip("/")) for name in files.listdir(path)):
            return "score_sde"
        raise UnknownFormat(
            f"{path}: folder has no model_info.json, config.json (diffusers) or checkpoint_<n> "
            "(score_sde)"
        )
    if not files.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    with files.open_file(path, "rb") as f:  # refuses a FIFO or device without blocking
        head = f.read(4)
        f.seek(0)
        is_zip = zipfile.is_zipfile(f)
    if head in (_ZIP_HEAD, _LEGACY_TORCH_HEAD) or is_zip:
        return "ddim"
    if (
        _SCORE_SDE_NAME.match(files.basename(path))
        or head[:1] in (b"\xde", b"\xdf")
        or (head and 0x81 <= head[0] <= 0x8F)
    ):
        return "score_sde"
    raise UnknownFormat(
        f"{path}: not a checkpoint this project reads (a torch .ckpt/.pth, a diffusers folder, "
        "a score_sde checkpoint_<n> or a model folder)"
    )


def load(
    path: str, format: str | None = None, image_size: int | None = None, config: str | None = None
) -> Imported:
    """Imports the checkpoint at ``path`` (format auto-detected unless given).

    Args:
        image_size: the training resolution of a ddim/SDEdit checkpoint, which its
            weights do not record (default 256, the size SDEdit's networks use).
        config: for score_sde checkpoints, a preset name or JSON config file (their
            weights do not record the network either); see :mod:`.score_sde`.
    """
    format = detect_format(path) if format is None else format
    if format == "diffusers":
        from sdedit_jax.importers import diffusers

        return diffusers.load(path)
    if format == "ddim":
        from sdedit_jax.importers import torch_checkpoint

        return torch_checkpoint.load(path, image_size=image_size)
    if format == "score_sde":
        try:
            score_sde = importlib.import_module("sdedit_jax.importers.score_sde")
        except ImportError as err:
            raise UnknownFormat(f"{path}: score_sde import is not available ({err})") from None
        return score_sde.load(path, config=config)
    if format == "model_folder":
        raise UnknownFormat(f"{path}: is already a model folder; load it with pretrained")
    raise UnknownFormat(f"format: must be one of {FORMATS}, got {format!r}")
