"""SDXL img2img and masked edits as batch jobs: the base model, or the refiner at a low t0.

    python -m sdedit_jax.main --config configs/sdxl.py:base --workdir runs/sdxl_base \
        --config.prompt="a photo of a church, detailed, sharp"

Variants: ``base`` (t0 = 0.6, guidance 5.0) and ``refiner`` (t0 = 0.3, the refiner's
default strength; aesthetic scores 6.0 / 2.5), both 1024 px. Each reads the converted
model folder ``models/sdxl_<variant>`` of the current folder (``--config.model_dir``;
a diffusers folder loads too) and edits the bundled 256 px photo guides resized to
1024 px. Prompts as in ``configs/sd.py``. Micro-conditioning (``config.sdxl``): the
original and target sizes are the guides' size and the crop (0, 0) unless set.

Weights: download the published diffusers folder once and convert it:

* ``base`` -> ``models/sdxl_base``: ``stabilityai/stable-diffusion-xl-base-1.0``;
* ``refiner`` -> ``models/sdxl_refiner``: ``stabilityai/stable-diffusion-xl-refiner-1.0``.

    huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 \
        --include "*.json" "*.txt" "*.safetensors" --exclude "*.fp16.*" "*_1_0.safetensors" \
        --local-dir downloads/stable-diffusion-xl-base-1.0
    python -m sdedit_jax.convert --source downloads/stable-diffusion-xl-base-1.0 \
        --out models/sdxl_base
    # or Stability's single file, with the folder's tokenizers (and configs, scheduler):
    python -m sdedit_jax.convert --source sd_xl_base_1.0.safetensors \
        --config_folder downloads/stable-diffusion-xl-base-1.0 --out models/sdxl_base

Sampling: SDE-DPM-Solver++(2M) with ``ceil(50 t0)`` steps on the model's own schedule.
"""

import ml_collections

from sdedit_jax.sampling.sampler import sampler_config
from sdedit_jax.util.config import download_hint, load_sibling, package_path

# variant: (model folder, published diffusers folder, t0, guidance scale)
VARIANTS = {
    "base": ("models/sdxl_base", "stabilityai/stable-diffusion-xl-base-1.0", 0.6, 5.0),
    "refiner": ("models/sdxl_refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", 0.3, 5.0),
}
SIZE = 1024


def missing_model(model_dir: str) -> str | None:
    """How to make a variant's missing model folder (what the job says), else None."""
    return download_hint(model_dir, {folder: hub for folder, hub, _, _ in VARIANTS.values()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/sdxl.py: variant {arg!r} unknown (known: {sorted(VARIANTS)})")
    model_dir, _, t0, guidance = VARIANTS[arg]
    config = load_sibling(__file__, "default").get_config()
    config.model_dir = model_dir
    config.input.path = package_path("assets", "photos_256")
    config.input.image_size = (SIZE, SIZE)
    config.input.resize = True
    config.t0s = (t0,)
    config.sampler = sampler_config(predictor="sde_dpm_solver_2m", steps_per_unit_time=50)
    config.guidance_scale = guidance
    config.per_device_batch = 1
    return config
