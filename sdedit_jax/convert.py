"""Converts a published checkpoint into a model folder that jobs and ``pretrained`` load.

    python -m sdedit_jax.convert --source ddpm-ema-church-256/ --out models/church_ddpm
    python -m sdedit_jax.convert --source church_outdoor.ckpt --out models/church_sdedit
    python -m sdedit_jax.convert --source checkpoint_126 --config church --out models/church_ve
    python -m sdedit_jax.convert --source stable-diffusion-v1-5/ --out models/sd15
    python -m sdedit_jax.convert --source v1-5-pruned-emaonly.safetensors \
        --config_folder stable-diffusion-v1-5/ --out models/sd15
    python -m sdedit_jax.convert --source sd_xl_base_1.0.safetensors \
        --config_folder stable-diffusion-xl-base-1.0/ --out models/sdxl_base

The format (a diffusers folder, an ermongroup/ddim or SDEdit ``.ckpt``/``.pth``, a
score_sde ``checkpoint_<n>``) is detected from the files; ``--format`` overrides it.
The folder records the network, its training SDE, parameterisation, conditioning
input and data range, and the source file's sha256 (see :mod:`sdedit_jax.pretrained`).
A Stable Diffusion model (a diffusers pipeline folder, or a single-file checkpoint with
``--config_folder``, the folder of its ``tokenizer/`` and ``scheduler/``; SD 1.x/2.x or
SDXL base/refiner, told apart by the file's keys) becomes a latent model folder: every
component, the tokenizer(s), schedule, prediction type, scaling factor, native size and
size multiple (see :mod:`sdedit_jax.latent.model` and :mod:`sdedit_jax.latent.sdxl`).

The folder appears whole or not at all: it is written into a temporary sibling
folder, loaded once from there, and renamed to ``--out``
(:func:`sdedit_jax.util.files.publish_folder`). An existing ``--out`` is refused
unless ``--overwrite`` replaces it (so of two converts into one new ``--out``
the second fails), and temporaries of a killed convert are removed by the next
convert into the same ``--out``.

Exit status: 0 on success; 2 with a one-line message on bad input (a source,
config or option the command cannot use, an existing ``--out``); 1 with one
line for other storage errors (e.g. a full disk). Never a traceback for these.
"""

from __future__ import annotations

import json
import sys

from sdedit_jax.util import quiet  # noqa: E402

tf = quiet.import_tensorflow()  # before anything else imports it

from absl import app, flags  # noqa: E402

from sdedit_jax import importers, pretrained  # noqa: E402
from sdedit_jax.latent import model as latent_model  # noqa: E402
from sdedit_jax.latent import sdxl  # noqa: E402
from sdedit_jax.sde import sde_from_config  # noqa: E402
from sdedit_jax.util import cli, files  # noqa: E402

EXIT_ERROR, EXIT_BAD_INPUT = 1, 2


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _define_flags() -> None:
    """Flags exist only when run as a program: importing ``convert`` (tests, tools) must
    not claim names such as ``--out`` and ``--config`` that other programs define."""
    flags.DEFINE_string("source", None, "checkpoint file or folder to convert")
    flags.DEFINE_string("out", None, "model folder to write")
    flags.DEFINE_enum(
        "format", None, list(importers.IMPORT_FORMATS), "source format (default: detected)"
    )
    flags.DEFINE_string(
        "sde",
        None,
        'training SDE as JSON, e.g. \'{"name": "ve", "sigma_min": 0.01, '
        '"sigma_max": 380}\' (default: from the checkpoint)',
    )
    flags.DEFINE_integer(
        "image_size", None, "training resolution of a ddim/SDEdit checkpoint (default 256)"
    )
    flags.DEFINE_string("config", None, "score_sde network config: a preset name or a JSON file")
    flags.DEFINE_string(
        "config_folder",
        None,
        "Stable Diffusion single file (SD or SDXL): the folder with its tokenizer/ "
        "(SDXL: tokenizer_2/) and scheduler/ (and, optionally, the components' config.json)",
    )
    flags.DEFINE_string("variant", None, 'weight variant of a diffusers folder, e.g. "fp16"')
    flags.DEFINE_bool("ema", True, "Stable Diffusion single file: its EMA weights if it has them")
    flags.DEFINE_bool(
        "bf16",
        False,
        "also write a bfloat16 copy of the weights (latent models: write them in bfloat16 only)",
    )
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")


def parse_sde(text: str | None) -> dict | None:
    """The ``--sde`` JSON object, checked by building the SDE once."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--sde: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--sde: expected a JSON object, got {text!r}")
    try:
        sde_from_config(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--sde: {err}") from None
    return value


def convert(
    source: str,
    out: str,
    *,
    format: str | None = None,
    sde: dict | None = None,
    image_size: int | None = None,
    config: str | None = None,
    with_bf16: bool = False,
    overwrite: bool = False,
    config_folder: str | None = None,
    variant: str | None = None,
    ema: bool = True,
) -> dict:
    """Imports ``source`` and publishes the model folder ``out``; returns its model_info.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False (checked before the
            import and again when the folder is published).
    """
    latent_options = {"config_folder": config_folder, "variant": variant, "ema": ema}
    if pretrained.is_latent(source, latent_options):
        with files.publish_folder(out, replace=overwrite) as folder:
            dtype = "bfloat16" if with_bf16 else None
            model = pretrained.load_latent(source, latent_options, param_dtype=dtype)
            save = (
                sdxl.save_folder if isinstance(model, sdxl.SDXLModel) else latent_model.save_folder
            )
            save(folder, model)
            del model  # one copy at a time: the check below reads the folder back
            pretrained.load_model(folder)  # proves the folder loads before it is published
            info = files.read_json_object(files.join(folder, pretrained.INFO_FILE))
        return info
    with files.publish_folder(out, replace=overwrite) as folder:
        imported = importers.load(source, format=format, image_size=image_size, config=config)
        pretrained.save_imported(folder, imported, sde=sde, with_bf16=with_bf16)
        pretrained.load_model(folder)  # proves the folder loads before it is published
        info = files.read_json_object(files.join(folder, pretrained.INFO_FILE))
    return info


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet.quiet_logs()
    f = flags.FLAGS
    for name in ("source", "out"):
        if not f[name].value:
            raise app.UsageError(f"--{name} is required")
    try:
        info = convert(
            f.source,
            f.out,
            format=f.format,
            sde=parse_sde(f.sde),
            image_size=f.image_size,
            config=f.config,
            with_bf16=f.bf16,
            overwrite=f.overwrite,
            config_folder=f.config_folder,
            variant=f.variant,
            ema=f.ema,
        )
    except FileExistsError as err:
        print(f"convert: --out {err}; pass --overwrite to replace it", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except (ValueError, FileNotFoundError, IsADirectoryError, files.NotRegularFile) as err:
        print(f"convert: {_one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as err:
        print(f"convert: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    fields = ("architecture", "sde", "parameterization", "condition", "data_range", "source")
    summary = {k: info[k] for k in fields if k in info}
    print(json.dumps({"out": f.out, **summary}, indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser(__doc__, prefix="convert"))
