"""Default score model: 32x32 RGB emoji, VP SDE, noise prediction, ~1.1M parameters.

Launch (resumes from the newest checkpoint when re-run):

    python -m sdedit_jax.train --config configs/train_emoji.py --workdir runs/emoji_default

Sized for a 2-core CPU: one residual block per level and attention only at
8x8 keep a step cheap enough for thousands of steps in about 90 minutes
(measured: 1.47 steps/s at batch 32 on an idle 2-core CPU, ~1 step/s shared;
46 images/s at any batch size from 32 to 64).

fast_conv is off: with this jax/XLA (0.10) the CPU conv weight gradient is
faster than the per-tap matmul one (0.68 vs 1.86 s per step at batch 32).

The shipped model continues that 5000-step run (``:continued``): copy its
checkpoints into a new workdir and train on, with the cosine schedule
stretched to 13000 steps and the run stopped at 11500 (session time):

    mkdir -p runs/emoji_long
    cp -r runs/emoji_default/{checkpoints,metrics.jsonl} runs/emoji_long/
    python -m sdedit_jax.train --config configs/train_emoji.py:continued --workdir runs/emoji_long
"""

import dataclasses

import ml_collections

from sdedit_jax.models import unet
from sdedit_jax.util.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(arg, "configs/train_emoji.py", continued=False)
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict(
        {
            "source": "emoji",
            "path": "data/emoji32",
            "image_size": 32,
            "num_channels": 3,
            "num_examples": None,
            "random_flip": True,
        }
    )

    config.model = ml_collections.ConfigDict(dataclasses.asdict(unet.UNetConfig()))

    config.sde = ml_collections.ConfigDict({"name": "vp", "beta_min": 0.1, "beta_max": 20.0})

    config.training = ml_collections.ConfigDict(
        {
            "batch_size": 32,
            "num_steps": 5000,
            "parameterization": "noise",
            "likelihood_weighting": False,
            "log_every": 50,
            "ckpt_every_steps": 500,
            "ckpt_every_secs": 600.0,
            "keep_checkpoints": 3,
        }
    )

    # AdamW with warmup, cosine decay, gradient clipping and an EMA of the weights.
    config.optim = ml_collections.ConfigDict(
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
        }
    )
    if variant.continued:
        config.training.num_steps = 11500  # where the shipped model's run stopped
        config.optim.decay_steps = 13000
    return config
