"""Tiny score model on 8x8 synthetic images, for tests and smoke runs (seconds on a CPU).

Launch:

    python -m sdedit_jax.train --config configs/train_tiny.py --workdir /tmp/tiny_run
"""

import ml_collections


def get_config(arg=None) -> ml_collections.ConfigDict:
    del arg  # no variants
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict(
        {
            "source": "synthetic",
            "path": "",
            "image_size": 8,
            "num_channels": 3,
            "num_examples": 64,
            "random_flip": True,
        }
    )

    config.model = ml_collections.ConfigDict(
        {
            "image_size": 8,
            "num_channels": 3,
            "nf": 8,
            "ch_mult": (1, 2),
            "num_res_blocks": 1,
            "attn_resolutions": (4,),
            "dropout": 0.1,
            "time_embedding": "sinusoidal",
            "fourier_scale": 16.0,
            "skip_rescale": True,
            "fast_conv": True,
        }
    )

    config.sde = ml_collections.ConfigDict({"name": "vp", "beta_min": 0.1, "beta_max": 20.0})

    config.training = ml_collections.ConfigDict(
        {
            "batch_size": 16,
            "num_steps": 20,
            "parameterization": "noise",
            "likelihood_weighting": False,
            "log_every": 5,
            "ckpt_every_steps": 10,
            "ckpt_every_secs": 600.0,
            "keep_checkpoints": 3,
        }
    )

    config.optim = ml_collections.ConfigDict(
        {
            "lr": 2e-3,
            "warmup_steps": 5,
            "schedule": "cosine",
            "decay_steps": 20,
            "final_lr_fraction": 0.1,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "ema_rate": 0.9,
        }
    )
    return config
