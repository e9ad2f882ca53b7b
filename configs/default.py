"""The main job: edit the bundled demo guides with the shipped emoji model.

    python -m sdedit_jax.main --config configs/default.py --workdir runs/demo

Each t0 in ``t0s`` is one resumable sub-job (``<workdir>/t0_<t0>``); steps follow
the rule ``ceil(steps_per_unit_time * t0)`` inside one compiled program; the default
sampler is SDE-DPM-Solver++(2M) with N = 100 (50 network calls at t0 = 0.5).
Variants: ``configs/default.py:quick`` (fewer steps, for smoke tests).

Every setting the job reads is listed here (``None`` where unset), so any of
them can be given on the command line, e.g. ``--config.input.source=tfds
--config.input.tfds_name=my_set`` or ``--config.output.npz=shards``. The t0 and
seed of the guide inputs come from ``t0s`` and ``seed``. The default paths
point into the installed package, so this file works from any folder.
"""

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

# The package folder, found without importing it (a config must load fast).
_PACKAGE = importlib.util.find_spec("sdedit_jax").submodule_search_locations[0]

# Configs load by path, not as a package: configs/common.py is loaded next to this file.
_spec = importlib.util.spec_from_file_location(
    "_sdedit_config_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_arg(arg, "configs/default.py", quick=False)
    config = ml_collections.ConfigDict()
    config.model_dir = "default"  # the shipped model in sdedit_jax/assets/default_model
    config.input = ml_collections.ConfigDict(
        {
            "source": "folder",  # folder | manifest | tfrecord | tfds (see data/guide_inputs/)
            "path": os.path.join(_PACKAGE, "assets", "demo"),
            "image_size": config_dict.placeholder(tuple),  # (height, width); None = the model's
            "channels": 3,
            "resize": False,
            "mask_dir": "masks",  # "" = no masks
            "tfds_name": "",
            "tfds_split": "test",
            "tfds_data_dir": config_dict.placeholder(str),
            "tfds_image_key": "image",
            "tfds_mask_key": "",
            "generator": "none",  # none | stroke_painting | stroke_edit | composite
            "generator_kwargs": ml_collections.ConfigDict(),  # e.g. '{"num_strokes": 8}'
            "max_pixels": 1 << 26,
            "num_parallel_calls": -1,  # -1 = autotune
            "prefetch_batches": 2,
        }
    )
    config.t0s = (0.3, 0.5, 0.7)
    # SDE-DPM-Solver++(2M) with ceil(100 t0) steps: 50 network calls at t0 = 0.5, a
    # tenth of the paper's recipe (ancestral, N = 1000) at its quality (EVALUATION.md,
    # "Few-step solvers"). The paper's sampler: predictor="ancestral", N = 1000.
    config.sampler = common.sampler(predictor="sde_dpm_solver_2m", steps_per_unit_time=100)
    config.repeats = 1
    config.seed = 0
    config.per_device_batch = 12
    config.output = ml_collections.ConfigDict(
        {
            "png": True,  # images/<name>.png
            "npz": "none",  # none | per_example (arrays/<name>.npz) | shards (one npz per batch)
            "png_compression": 1,  # zlib level 0..9: 1 is fast (large jobs), 9 smallest
            "writer_threads": config_dict.placeholder(int),  # None = one per CPU core
        }
    )
    config.overwrite = False  # True: delete a workdir's outputs of another configuration
    config.contact_sheet = True
    config.progress_every_s = 10.0  # a progress line (log files) and throughput row this often
    if variant.quick:
        config.sampler.steps_per_unit_time = 20
    return config
