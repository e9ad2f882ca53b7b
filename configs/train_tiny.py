"""Tiny score model on 8x8 synthetic images, for tests and smoke runs (seconds on a CPU).

Launch:

    python -m sdedit_jax.train --config configs/train_tiny.py --workdir /tmp/tiny_run

``configs/train_emoji.py`` with a tiny network, synthetic data and a 20-step schedule.
"""

import importlib.util
import os

import ml_collections

# Configs load by path, not as a package: configs/common.py is loaded next to this file.
_spec = importlib.util.spec_from_file_location(
    "_sdedit_config_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    common.parse_arg(arg, "configs/train_tiny.py")  # no variants
    config = common.load("train_emoji").get_config()
    config.data.update(source="synthetic", path="", image_size=8, num_examples=64)
    config.model = common.tiny_unet(image_size=8)
    config.training.update(batch_size=16, num_steps=20, log_every=5, ckpt_every_steps=10)
    config.optim.update(lr=2e-3, warmup_steps=5, decay_steps=20, ema_rate=0.9)
    return config
