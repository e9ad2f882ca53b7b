"""A tiny evaluation sweep for tests and smoke runs (seconds on a CPU).

    python -m sdedit_jax.evaluate --config configs/eval_tiny.py \
        --config.model_dir=/path/to/model --workdir /tmp/eval_tiny

Same fields as ``configs/eval_emoji.py``: 8 held-out emoji as stroke paintings
and stroke edits, two t0 values, N = 20 steps per unit time, 16 reference
images and small KID subsets. Point ``input.path`` and ``reference.paths`` at
other folders to run without ``data/emoji32``; with a model of another size
set ``input.resize`` and ``reference.resize``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg  # no variants
    config = ml_collections.ConfigDict()
    config.model_dir = "default"
    config.seed = 0
    config.input = ml_collections.ConfigDict({
        "source": "folder",
        "path": "data/emoji32/test",
        "resize": False,
        "mask_dir": "",
    })
    config.max_guides = 8
    config.tasks = ("stroke_painting", "stroke_edit")
    config.generator_kwargs = ml_collections.ConfigDict({
        "stroke_painting": {"num_colors": 4, "median_size": 3},
        "stroke_edit": {},
    })
    config.reference = ml_collections.ConfigDict({
        "source": "folder",
        "paths": ("data/emoji32/train",),
        "resize": False,
        "mask_dir": "",
        "max_images": 16,
    })
    config.t0s = (0.3, 0.7)
    config.sampler = ml_collections.ConfigDict({
        "predictor": "euler_maruyama",
        "corrector": "none",
        "steps_per_unit_time": 20,
        "n_steps": 0,
        "max_steps": 0,
        "snr": 0.16,
        "corrector_steps": 1,
        "denoise": True,
    })
    config.repeats = 1
    config.variants = ()
    config.per_device_batch = 1
    config.feature_extractor = "efficientnet_lite0"  # or "inception_v3" (needs weights)
    config.feature_weights_path = ""  # local FID Inception weights (.pth / .npz)
    config.feature_batch_size = 8
    config.kid = ml_collections.ConfigDict({"subset_size": 8, "num_subsets": 10})
    config.contact_sheet_examples = 4
    return config
