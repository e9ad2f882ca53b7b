"""Tiny score model on 8x8 synthetic images, for tests and smoke runs (seconds on a CPU).

Launch:

    python -m sdedit_jax.train --config configs/train_tiny.py --workdir /tmp/tiny_run

``configs/train_emoji.py`` with a tiny network, synthetic data and a 20-step schedule.
"""

import dataclasses

import ml_collections

from sdedit_jax.models import unet
from sdedit_jax.util.config import load_sibling, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parse_arg(arg, "configs/train_tiny.py")  # no variants
    config = load_sibling(__file__, "train_emoji").get_config()
    config.data.update(source="synthetic", path="", image_size=8, num_examples=64)
    config.model = ml_collections.ConfigDict(
        dataclasses.asdict(
            unet.UNetConfig(
                image_size=8,
                nf=8,
                ch_mult=(1, 2),
                attn_resolutions=(4,),
                dropout=0.1,
                fast_conv=True,
            )
        )
    )
    config.training.update(batch_size=16, num_steps=20, log_every=5, ckpt_every_steps=10)
    config.optim.update(lr=2e-3, warmup_steps=5, decay_steps=20, ema_rate=0.9)
    return config
