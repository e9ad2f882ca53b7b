"""The main job: edit the bundled demo guides with the shipped emoji model.

    python -m sdedit_jax.main --config configs/default.py --workdir runs/demo

Each t0 in ``t0s`` is one resumable sub-job (``<workdir>/t0_<t0>``); steps follow
the paper's rule ``ceil(steps_per_unit_time * t0)`` inside one compiled program.
Variants: ``configs/default.py:quick`` (fewer steps, for smoke tests).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_dir = "default"  # the shipped model in sdedit_jax/assets/default_model
    config.input = ml_collections.ConfigDict({
        "source": "folder",
        "path": "sdedit_jax/assets/demo",
        "image_size": (32, 32),
        "channels": 3,
        "resize": False,
    })
    config.t0s = (0.3, 0.5, 0.7)
    config.sampler = ml_collections.ConfigDict({
        "predictor": "euler_maruyama",
        "corrector": "none",
        "steps_per_unit_time": 500,  # the paper's N; 0 -> use n_steps for every t0
        "n_steps": 0,
        "max_steps": 0,  # step bucket; 0 -> derived from the step counts
        "snr": 0.16,
        "corrector_steps": 1,
        "denoise": True,
        "eta": 0.0,  # DDIM's noise level (ddim only)
        "time_grid": "",  # uniform | logsnr | karras; "" = the predictor's default
    })
    config.repeats = 1
    config.seed = 0
    config.per_device_batch = 12
    config.save_npz = False
    config.contact_sheet = True
    if arg == "quick":
        config.sampler.steps_per_unit_time = 50
    elif arg not in (None, ""):
        raise ValueError(f"configs/default.py: unknown variant {arg!r} (known: quick)")
    return config
