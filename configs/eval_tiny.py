"""A tiny evaluation sweep for tests and smoke runs (seconds on a CPU).

    python -m sdedit_jax.evaluate --config configs/eval_tiny.py \
        --config.model_dir=/path/to/model --workdir /tmp/eval_tiny

``configs/eval_emoji.py`` cut down: 8 held-out emoji as stroke paintings and stroke
edits, two t0 values, Euler-Maruyama with N = 20 steps per unit time, 16 reference
images and small KID subsets. Point ``input.path`` and ``reference.paths`` at other
folders to use other images than the cached emoji (see ``configs/eval_emoji.py``);
with a model of another size set ``input.resize`` and ``reference.resize``.
"""

import ml_collections

from sdedit_jax.util.config import load_sibling, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parse_arg(arg, "configs/eval_tiny.py")  # no variants
    config = load_sibling(__file__, "eval_emoji").get_config()
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
