"""Blocks the configs share, and big_vision-style variant arguments.

Configs are loaded by path (``--config configs/default.py:quick``), not imported as a
package, so each config loads this file with a few lines of ``importlib`` and other
configs through :func:`load`; all of them keep loading from any folder (the installed
copies sit together in ``<prefix>/share/sdedit_jax/configs``).

Variant arguments follow big_vision's ``get_config(arg)``: ``"quick"`` or
``"quick,steps=50"``: bare words set boolean fields, ``key=value`` sets a field of the
default's type; :func:`parse_arg` rejects keys a config does not declare.
"""

import importlib.util
import os
from types import ModuleType

import ml_collections

from sdedit_jax.sampling.sampler import all_options

_HERE = os.path.dirname(os.path.abspath(__file__))


def load(name: str) -> ModuleType:
    """The config module ``<name>.py`` next to this file (to derive one config from another)."""
    spec = importlib.util.spec_from_file_location(f"_sdedit_config_{name}", f"{_HERE}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_folder(name: str) -> str:
    """``$XDG_CACHE_HOME/sdedit_jax/<name>`` (``~/.cache`` when unset): data built on first use.

    Not the current folder, so a command works the same from any folder.
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sdedit_jax", name)


def _cast(where: str, key: str, default, text: str):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where}: variant {key}={text!r} is not a boolean")
        return text.lower() in ("true", "1")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(
            f"{where}: variant {key}={text!r} is not a {type(default).__name__}"
        ) from None


def parse_arg(arg: str | None, where: str, **spec) -> ml_collections.ConfigDict:
    """The variant string ``arg`` as ``spec``'s fields (``spec`` holds the defaults).

    ``where`` (the config's path) starts every error message.
    """
    values = ml_collections.ConfigDict(spec)
    for item in filter(None, (arg or "").split(",")):
        key, eq, text = item.partition("=")
        if key not in spec:
            known = ", ".join(spec) or "none"
            raise ValueError(f"{where}: unknown variant {key!r} (known: {known})")
        if not eq and not isinstance(spec[key], bool):
            raise ValueError(f"{where}: variant {key!r} needs a value ({key}=...)")
        values[key] = _cast(where, key, spec[key], text) if eq else True
    return values


# One line per sampler field: the meaning that `--help` prints (configs/default.py); the
# solvers' own options (eta, snr, ...) come with their meaning from the solvers.
SAMPLER_DOCS = {
    "predictor": "the reverse-SDE/ODE solver (sdedit_jax.PREDICTORS), e.g. ancestral, ddim",
    "corrector": "none | langevin (a Langevin MCMC step after each predictor step)",
    "steps_per_unit_time": "the paper's N: ceil(N * t0) steps per edit; 0 -> n_steps",
    "n_steps": "a fixed number of steps for every t0 (when steps_per_unit_time is 0)",
    "max_steps": "the compiled step bucket; 0 -> derived from the step counts",
    **{name: doc for name, (_, doc) in all_options().items()},
    "denoise": "return the noise-free mean of the last step (score_sde's noise_removal)",
    "time_grid": "uniform | logsnr | karras; '' = the predictor's default",
}


def sampler(**changes) -> ml_collections.ConfigDict:
    """Every sampler field the job and the evaluation read (``sampler_from_config``)."""
    fields = {
        "predictor": "euler_maruyama",
        "corrector": "none",
        "steps_per_unit_time": 100,
        "n_steps": 0,
        "max_steps": 0,
        **{name: default for name, (default, _) in all_options().items()},
        "denoise": True,
        "time_grid": "",
    }
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(f"configs/common.py: sampler has no field {unknown[0]!r}")
    return ml_collections.ConfigDict({**fields, **changes})


def unet(**changes) -> ml_collections.ConfigDict:
    """The U-Net of the shipped emoji model (``models/unet.UNetConfig`` fields)."""
    return ml_collections.ConfigDict(
        {
            "image_size": 32,
            "num_channels": 3,
            "nf": 32,
            "ch_mult": (1, 2, 2),
            "num_res_blocks": 1,
            "attn_resolutions": (8,),
            "dropout": 0.0,
            "time_embedding": "sinusoidal",
            "fourier_scale": 16.0,
            "skip_rescale": True,
            "fast_conv": False,
            **changes,
        }
    )


def tiny_unet(image_size: int = 8) -> ml_collections.ConfigDict:
    """A U-Net small enough for tests and smoke runs (seconds on a CPU)."""
    return unet(
        image_size=image_size,
        nf=8,
        ch_mult=(1, 2),
        attn_resolutions=(image_size // 2,),
        dropout=0.1,
        fast_conv=True,
    )


def optimiser(**changes) -> ml_collections.ConfigDict:
    """AdamW with warmup, cosine decay, gradient clipping and an EMA of the weights."""
    return ml_collections.ConfigDict(
        {
            "lr": 1e-3,
            "warmup_steps": 200,
            "schedule": "cosine",
            "decay_steps": 5000,
            "final_lr_fraction": 0.1,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "ema_rate": 0.999,
            **changes,
        }
    )
