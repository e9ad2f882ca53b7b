"""Stable Diffusion img2img and masked edits (latent SDEdit) as batch jobs.

    python -m sdedit_jax.main --config configs/sd.py:sd15 --workdir runs/sd15 \
        --config.prompt="a photo of a church, detailed, sharp"

Variants: ``sd15``, ``sd21_base`` (both 512 px, epsilon prediction) and ``sd21``
(768 px, v-prediction). Each reads the converted model folder ``models/<variant>`` of
the current folder (``--config.model_dir`` to change it; a diffusers folder or a
converted one both load) and edits the bundled 256 px photo guides (stroke paintings,
stroke edits, composites, with their masks) at 512 px. Prompts: a manifest's
``prompt`` / ``negative_prompt`` / ``guidance_scale`` columns, a folder guide's
sidecar caption ``<name>.txt``, else ``--config.prompt`` (a row with none fails).

Weights: download the published diffusers folder once and convert it:

* ``sd15`` -> ``models/sd15``: ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (formerly
  ``runwayml/stable-diffusion-v1-5``);
* ``sd21_base`` -> ``models/sd21_base``: ``stabilityai/stable-diffusion-2-1-base``;
* ``sd21`` -> ``models/sd21``: ``stabilityai/stable-diffusion-2-1``.

    huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --include "*.json" "*.txt" "*.safetensors" --exclude "*.fp16.*" "*ema*" \
        --local-dir downloads/stable-diffusion-v1-5
    python -m sdedit_jax.convert --source downloads/stable-diffusion-v1-5 --out models/sd15
    # or a single file with the folder's tokenizer/ and scheduler/:
    python -m sdedit_jax.convert --source v1-5-pruned-emaonly.safetensors \
        --config_folder downloads/stable-diffusion-v1-5 --out models/sd15

Sampling: SDE-DPM-Solver++(2M) with ``ceil(50 t0)`` steps (25 U-Net calls, each one
classifier-free-guidance pair, at t0 = 0.5) on the model's own schedule, guidance 7.5.
``t0`` is diffusers' ``strength``; see README "Stable Diffusion" for the mapping to
its ``num_inference_steps``.
"""

import ml_collections

from sdedit_jax.sampling.sampler import sampler_config
from sdedit_jax.util.config import download_hint, load_sibling, package_path

# variant: (model folder, published diffusers folder, pixel size the guides are resized to)
VARIANTS = {
    "sd15": ("models/sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    "sd21_base": ("models/sd21_base", "stabilityai/stable-diffusion-2-1-base", 512),
    "sd21": ("models/sd21", "stabilityai/stable-diffusion-2-1", 768),
}


def missing_model(model_dir: str) -> str | None:
    """How to make a variant's missing model folder (what the job says), else None."""
    return download_hint(model_dir, {folder: hub for folder, hub, _ in VARIANTS.values()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/sd.py: variant {arg!r} unknown (known: {sorted(VARIANTS)})")
    model_dir, _, size = VARIANTS[arg]
    config = load_sibling(__file__, "default").get_config()
    config.model_dir = model_dir
    config.input.path = package_path("assets", "photos_256")
    config.input.image_size = (size, size)
    config.input.resize = True
    config.t0s = (0.5,)
    config.sampler = sampler_config(predictor="sde_dpm_solver_2m", steps_per_unit_time=50)
    config.guidance_scale = 7.5
    config.per_device_batch = 1
    return config
