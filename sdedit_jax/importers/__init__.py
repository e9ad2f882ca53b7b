"""Importing published diffusion checkpoints (at the boundary) into the project's networks.

Formats (``detect_format`` tells them apart from the files themselves, asking each
module of :data:`MODULES` in turn):

* ``"diffusers"``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``
  or ``.bin`` (or a pipeline folder with such a ``unet/``): :mod:`.diffusers`.
* ``"ddim"``: an ermongroup/ddim or SDEdit ``.ckpt``/``.pth`` torch file: :mod:`.torch_checkpoint`.
* ``"score_sde"``: a score_sde Flax checkpoint (msgpack ``checkpoint_<n>``): :mod:`.score_sde`.
* ``"model_folder"``: this project's own model folder (read by :mod:`sdedit_jax.pretrained`).

Each format module has its ``FORMAT`` name, ``detect(path) -> bool``, the ``OPTIONS``
of :func:`load` it reads, and ``load(path, **options)``; a new format is one module
added to :data:`MODULES`. Every importer returns an :class:`Imported`: the network
(architecture name, config, weights) and what is needed to use it as a score model,
or raises one ``ValueError`` naming the file and the problem. Nothing here executes
code from a checkpoint.
"""

from __future__ import annotations

from sdedit_jax.importers import diffusers, score_sde, torch_checkpoint
from sdedit_jax.importers.imported import Imported
from sdedit_jax.util import files, safetensors_files

# In detection order: a folder is diffusers' before score_sde's, a file ddim's before score_sde's.
MODULES = (diffusers, torch_checkpoint, score_sde)
IMPORT_FORMATS = tuple(m.FORMAT for m in MODULES)
FORMATS = (*IMPORT_FORMATS, "model_folder")
CONDITIONS = ("t", "timestep", "sigma")
DATA_RANGES = {"-1_1": (-1.0, 1.0), "0_1": (0.0, 1.0)}


class UnknownFormat(ValueError):
    """The path is not a checkpoint format this project reads."""


def detect_format(path: str) -> str:
    """The format of ``path`` (one of :data:`FORMATS`), from its contents (any file system)."""
    is_dir = files.isdir(path)
    if is_dir and files.exists(files.join(path, "model_info.json")):
        return "model_folder"
    if not is_dir and not files.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    for module in MODULES:
        if module.detect(path):
            return module.FORMAT
    if is_dir:
        raise UnknownFormat(
            f"{path}: folder has no model_info.json, config.json (diffusers) or checkpoint_<n> "
            "(score_sde)"
        )
    if _is_latent_single_file(path):
        raise UnknownFormat(
            f"{path}: a Stable Diffusion single file (model.diffusion_model.*) carries no "
            "tokenizer: pass config_folder= (convert --config_folder) a folder with its "
            "tokenizer/ (SDXL: tokenizer/ and tokenizer_2/, the refiner tokenizer_2/ only)"
        )
    raise UnknownFormat(
        f"{path}: not a checkpoint this project reads (a torch .ckpt/.pth, a diffusers folder, "
        "a score_sde checkpoint_<n> or a model folder)"
    )


def _is_latent_single_file(path: str) -> bool:
    """A safetensors file in ldm/sgm's layout (its header read, never its tensors)."""
    if not path.endswith(".safetensors"):
        return False
    try:
        names = safetensors_files.read_header(path)[0]
    except ValueError:
        return False
    return any(name.startswith("model.diffusion_model.") for name in names)


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
    if format == "model_folder":
        raise UnknownFormat(f"{path}: is already a model folder; load it with pretrained")
    module = {m.FORMAT: m for m in MODULES}.get(format)
    if module is None:
        raise UnknownFormat(f"format: must be one of {FORMATS}, got {format!r}")
    options = {"image_size": image_size, "config": config}
    return module.load(path, **{name: options[name] for name in module.OPTIONS})
