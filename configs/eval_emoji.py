"""Realism vs faithfulness of the default emoji model over t0 (the SDEdit trade-off curve).

    python -m sdedit_jax.evaluate --config configs/eval_emoji.py --workdir runs/eval_emoji

Guides are made from the 127 held-out emoji (``emoji32/test`` of the cache folder
``$XDG_CACHE_HOME/sdedit_jax``, by default ``~/.cache/sdedit_jax``; the evaluate command
renders it from the Debian emoji font on first use, in about 3 s, as
``python -m sdedit_jax.data.emoji --out <cache>/emoji32 --size 32`` does) by
three tasks: simulated stroke paintings as in the paper, cruder ones (3 colours,
no blur), and stroke edits (strokes inside a mask). Realism is measured against
the 1,319 training emoji (never the guides' own originals). Ancestral (DDPM)
sampling with N = ``steps_per_unit_time`` = 200 gives ceil(200 * t0) steps
(40..160) per edit; about 20 minutes on an idle 2-core CPU (sampling plus
EfficientNet features; reference features are cached in the workdir).
Variants: ``configs/eval_emoji.py:quick`` (N = 50, 32 guides: a smoke run),
``configs/eval_emoji.py:samplers`` (adds Euler-Maruyama, a probability-flow ODE
and a predictor-corrector variant), ``configs/eval_emoji.py:tasks`` (adds composites),
``configs/eval_emoji.py:few_step`` (the paper's recipe against DDIM, DPM-Solver++(2M)
and SDE-DPM-Solver++(2M) at 5-50 network calls; see EVALUATION.md).
"""

import os

import ml_collections

from sdedit_jax.sampling.sampler import sampler_config
from sdedit_jax.util.config import cache_folder, parse_arg

EMOJI = cache_folder("emoji32")  # built by `python -m sdedit_jax.evaluate` on first use


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(
        arg, "configs/eval_emoji.py", quick=False, samplers=False, tasks=False, few_step=False
    )
    config = ml_collections.ConfigDict()
    config.model_dir = "default"  # the shipped model in sdedit_jax/assets/default_model
    config.seed = 0
    # Held-out images the guides are made from (guide_inputs fields; the image
    # size, channels, generator and seed come from the model and the fields below).
    config.input = ml_collections.ConfigDict(
        {
            "source": "folder",
            "path": os.path.join(EMOJI, "test"),
            "resize": False,
            "folder": {"mask_dir": ""},
        }
    )
    config.max_guides = 0  # 0 = every held-out image
    config.samples_per_guide = 1  # outputs per guide, each with its own noise
    # Guide generators (see sdedit_jax.data.guides), each one task of the sweep.
    config.tasks = ("stroke_painting", "crude_stroke_painting", "stroke_edit")
    # A task is a generator name, or a name whose entry names its "generator".
    config.generator_kwargs = ml_collections.ConfigDict(
        {
            "stroke_painting": {},  # the paper's simulation: median filter, 6 flat colours
            # Emoji are flat-coloured already, so 6-colour paintings stay emoji-like;
            # 3 colours over a 9-pixel median (no blur) is closer to a crude hand painting.
            "crude_stroke_painting": {
                "generator": "stroke_painting",
                "num_colors": 3,
                "median_size": 9,
                "blur_sigma": 0.0,
            },
            "stroke_edit": {},
            "composite": {},
        }
    )
    # Real images that define "realistic"; paths are read in order and concatenated.
    config.reference = ml_collections.ConfigDict(
        {
            "source": "folder",
            # Training emoji only: the held-out originals of the guides must not be
            # in the reference, or the guides would be scored against their own sources.
            "paths": (os.path.join(EMOJI, "train"),),
            "resize": False,
            "folder": {"mask_dir": ""},
            "max_images": 0,  # 0 = all
        }
    )
    config.t0s = (0.2, 0.35, 0.5, 0.65, 0.8)
    # DDPM's sampler, as the paper uses for VP models, with the paper's N = 200.
    config.sampler = sampler_config(predictor="ancestral", steps_per_unit_time=200)
    config.repeats = 1
    # Further sampler settings, each a dict of sampler fields and/or repeats
    # (plus an optional name), run after the base sampler above.
    config.variants = ()
    config.per_device_batch = 64
    config.feature_extractor = "efficientnet_lite0"  # or "inception_v3" (needs weights)
    config.feature_weights_path = ""  # local FID Inception weights (.pth / .npz)
    config.feature_batch_size = 32
    config.kid = ml_collections.ConfigDict({"subset_size": 100, "num_subsets": 100})
    config.contact_sheet_examples = 12
    if variant.quick:
        config.sampler.steps_per_unit_time = 50
        config.max_guides = 32
    if variant.samplers:
        config.variants = (
            {"name": "euler_maruyama", "predictor": "euler_maruyama"},
            {"name": "ode_heun", "predictor": "ode_heun"},
            {"name": "em+langevin", "predictor": "euler_maruyama", "corrector": "langevin"},
        )
    if variant.few_step:
        # The paper's recipe (VP ancestral, N = 1000: 1000 * t0 calls) against the
        # few-step solvers at 5..50 calls: all 127 held-out guides x 8 samples (1,016
        # outputs per setting) per task and t0. About 4.6M network calls (3.0M of them
        # the recipe's) plus EfficientNet features of 78 settings: about 9 h on the
        # 2-core CPU (scoring alone ~100 s per setting); resumable per batch.
        config.t0s = (0.35, 0.5, 0.65)
        config.tasks = ("stroke_painting", "stroke_edit")
        config.max_guides = 0
        config.samples_per_guide = 8
        config.sampler.steps_per_unit_time = 1000
        # One compiled program per solver (max_steps 64): n_steps is traced.
        config.variants = tuple(
            {
                "name": f"{solver}@{nfe}",
                "predictor": solver,
                "steps_per_unit_time": 0,
                "n_steps": nfe,
                "max_steps": 64,
            }
            for solver, nfes in (
                ("sde_dpm_solver_2m", (5, 10, 20, 50)),  # the default solver first
                ("dpm_solver_2m", (5, 10, 20, 50)),
                ("ddim", (5, 10, 20, 50)),
            )
            for nfe in nfes
        )
    if variant.tasks:
        config.tasks = ("stroke_painting", "crude_stroke_painting", "stroke_edit", "composite")
    return config
