"""SDXL img2img and masked edits as batch jobs: the base model, the refiner at a low t0,
or both in one command (the base edit, then the refiner over its float outputs).

    python -m sdedit_jax.main --config configs/sdxl.py:base --workdir runs/sdxl_base \
        --config.prompt="a photo of a church, detailed, sharp"
    python -m sdedit_jax.main --config configs/sdxl.py:base_refiner --workdir runs/sdxl \
        --config.prompt="a photo of a church, detailed, sharp"

Variants: ``base`` (t0 = 0.6, guidance 5.0) and ``refiner`` (t0 = 0.3, the refiner's
default strength; aesthetic scores 6.0 / 2.5), both 1024 px. Each reads the converted
model folder ``models/sdxl_<variant>`` of the current folder (``--config.model_dir``;
a diffusers folder loads too) and edits the bundled 256 px photo guides resized to
1024 px. Prompts as in ``configs/sd.py``. Micro-conditioning (``config.sdxl``): the
original and target sizes are the guides' size and the crop (0, 0) unless set; a
manifest row's own ``original_size``, ``crops_coords_top_left``, ``target_size``
(base; ``"H,W"`` or ``[H, W]``), ``aesthetic_score``, ``negative_aesthetic_score``
(refiner) replace them for that row.

``base_refiner``: the base job in ``<workdir>/base`` (the ``base`` settings, float
arrays on), then the refiner job in ``<workdir>/refiner`` over the base's
``arrays/*.npz`` (``sdedit_jax/jobs/two_stage.py``): each row keeps its id, seed,
prompt, negative prompt, original size, crop and its original guide's mask. The
second stage's own settings are ``--config.refiner.<field>`` (``model_dir``, ``t0s``,
``guidance_scale``, ``aesthetic_score``, ``negative_aesthetic_score``); the rest is
the base's. Re-running the command resumes both stages.

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
TWO_STAGE = "base_refiner"


def missing_model(model_dir: str) -> str | None:
    """How to make a variant's missing model folder (what the job says), else None."""
    return download_hint(model_dir, {folder: hub for folder, hub, _, _ in VARIANTS.values()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg == TWO_STAGE:
        return _base_refiner()
    if arg not in VARIANTS:
        known = sorted([*VARIANTS, TWO_STAGE])
        raise ValueError(f"configs/sdxl.py: variant {arg!r} unknown (known: {known})")
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


def _base_refiner() -> ml_collections.ConfigDict:
    """The base job with float outputs, and the refiner stage's own settings."""
    config = get_config("base")
    config.output.npz = "per_example"
    model_dir, _, t0, guidance = VARIANTS["refiner"]
    config.refiner = ml_collections.ConfigDict(
        {
            "model_dir": model_dir,
            "t0s": (t0,),
            "guidance_scale": guidance,
            "aesthetic_score": 6.0,
            "negative_aesthetic_score": 2.5,
        }
    )
    return config
