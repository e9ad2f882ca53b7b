"""A tiny evaluation sweep for tests and smoke runs (seconds on a CPU).

    python -m sdedit_jax.evaluate --config configs/eval_tiny.py \
        --config.model_dir=/path/to/model --workdir /tmp/eval_tiny

``configs/eval_emoji.py`` cut down: 8 held-out emoji as stroke paintings and stroke
edits, two t0 values, Euler-Maruyama with N = 20 steps per unit time, 16 reference
images and small KID subsets. Point ``input.path`` and ``reference.paths`` at other
folders to use other images than the cached emoji (see ``configs/eval_emoji.py``);
with a model of another size set ``input.resize`` and ``reference.resize``.
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
    common.parse_arg(arg, "configs/eval_tiny.py")  # no variants
    config = common.load("eval_emoji").get_config()
    config.max_guides = 8
    config.tasks = ("stroke_painting", "stroke_edit")
    config.generator_kwargs = ml_collections.ConfigDict(
        {"stroke_painting": {"num_colors": 4, "median_size": 3}, "stroke_edit": {}}
    )
    config.reference.max_images = 16
    config.t0s = (0.3, 0.7)
    config.sampler.update(predictor="euler_maruyama", steps_per_unit_time=20)
    config.per_device_batch = 1
    config.feature_batch_size = 8
    config.kid.update(subset_size=8, num_subsets=10)
    config.contact_sheet_examples = 4
    return config
