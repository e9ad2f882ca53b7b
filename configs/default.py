"""The main job: edit the bundled demo guides with the shipped emoji model.

    python -m sdedit_jax.main --config configs/default.py --workdir runs/demo

Each t0 in ``t0s`` is one resumable sub-job (``<workdir>/t0_<t0>``); steps follow
the rule ``ceil(steps_per_unit_time * t0)`` inside one compiled program; the default
sampler is SDE-DPM-Solver++(2M) with N = 100 (50 network calls at t0 = 0.5).
Variants: ``configs/default.py:quick`` (fewer steps, for smoke tests).

Every setting the job reads is listed here (``None`` where unset), so any of
them can be given on the command line, e.g. ``--config.input.source=tfds
--config.input.tfds.name=my_set`` or ``--config.output.npz=shards``. A guide
source's own settings are its block (``input.folder``, ``input.tfds``); the flat
keys they replaced (``input.mask_dir``, ``input.tfds_name``, ...) are refused
with their new name. The t0 and seed of the guide inputs come from ``t0s`` and
``seed``. ``FIELD_DOCS`` says what each field means (``python -m
sdedit_jax.main --help`` prints it). The default paths
point into the installed package, so this file works from any folder.
"""

import ml_collections
from ml_collections import config_dict

from sdedit_jax.data.guide_inputs import sources
from sdedit_jax.sampling.sampler import sampler_config, sampler_docs
from sdedit_jax.util.config import package_path, parse_arg

# One line per field: what `python -m sdedit_jax.main --help` prints beside each default.
FIELD_DOCS = {
    "model_dir": "model folder (python -m sdedit_jax.convert), or 'default' for the shipped model",
    "input.source": "folder | manifest | tfrecord | tfds (see sdedit_jax/data/guide_inputs/)",
    "input.path": "guide folder, manifest file (.jsonl/.csv) or comma-separated TFRecord globs",
    "input.image_size": "(height, width) of the guides; None = the model's own size",
    "input.channels": "3 (RGB) or 1 (grayscale)",
    "input.resize": "resize guides and masks of another size to image_size",
    **sources.option_docs(),
    "input.generator": "none | stroke_painting | stroke_edit | composite: guides made from images",
    "input.generator_kwargs": "the generator's settings as JSON, e.g. '{\"num_strokes\": 8}'",
    "input.max_pixels": "larger images fail (one failure row) before they are decoded",
    "input.num_parallel_calls": "decode parallelism (-1 = autotune)",
    "input.prefetch_batches": "batches prefetched ahead of the device loop",
    "t0s": "start times of the edits, one sub-job (workdir/t0_<t0>/) each",
    **{f"sampler.{k}": v for k, v in sampler_docs().items()},
    "repeats": "SDEdit's K: noise-and-denoise rounds per edit",
    "seed": "job seed; every random draw comes from (seed, example id)",
    "per_device_batch": "images per device per batch",
    "output.png": "write images/<name>.png",
    "output.npz": "none | per_example (arrays/<name>.npz) | shards (one npz per batch)",
    "output.png_compression": "zlib level 0..9: 1 is fast (large jobs), 9 smallest",
    "output.writer_threads": "image writer threads (None = one per CPU core)",
    "overwrite": "True: delete a workdir's outputs of another configuration",
    "contact_sheet": "write <workdir>/contact_sheet.png (guides and edits side by side)",
    "progress_every_s": "seconds between progress lines (log files) and throughput rows",
    "prompt": "text-to-image models: the prompt of rows naming none (manifest field, caption)",
    "negative_prompt": "text-to-image models: the negative prompt of rows naming none",
    "guidance_scale": "text-to-image models: guidance of rows naming none (None = 7.5)",
    "latent.posterior": "latent models: mean | sample (the VAE posterior, from the row's key)",
    "latent.mask_downsample": "latent models: max_pool | nearest (masks to the latent grid)",
    "sdxl.original_size": "SDXL: (height, width) the image is said to have had (None = guides')",
    "sdxl.crops_coords_top_left": "SDXL: (top, left) of the crop the model is told of",
    "sdxl.target_size": "SDXL base: (height, width) asked for (None = the guides' size)",
    "sdxl.aesthetic_score": "SDXL refiner: the aesthetic score of the prompts",
    "sdxl.negative_aesthetic_score": "SDXL refiner: the aesthetic score of the negative half",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(arg, "configs/default.py", quick=False)
    config = ml_collections.ConfigDict()
    config.model_dir = "default"
    config.input = ml_collections.ConfigDict(
        {
            "source": "folder",
            "path": package_path("assets", "demo"),
            "image_size": config_dict.placeholder(tuple),  # (height, width); None = the model's
            "channels": 3,
            "resize": False,
            # One block per source with options of its own (sdedit_jax/data/guide_inputs/sources/).
            **sources.option_blocks(),
            "generator": "none",
            "generator_kwargs": ml_collections.ConfigDict(),
            "max_pixels": 1 << 26,
            "num_parallel_calls": -1,
            "prefetch_batches": 2,
        }
    )
    config.t0s = (0.3, 0.5, 0.7)
    # SDE-DPM-Solver++(2M) with ceil(100 t0) steps: 50 network calls at t0 = 0.5, a
    # tenth of the paper's recipe (ancestral, N = 1000) at its quality (EVALUATION.md,
    # "Few-step solvers"). The paper's sampler: predictor="ancestral", N = 1000.
    config.sampler = sampler_config(predictor="sde_dpm_solver_2m", steps_per_unit_time=100)
    config.repeats = 1
    config.seed = 0
    config.per_device_batch = 12
    config.output = ml_collections.ConfigDict(
        {
            "png": True,
            "npz": "none",
            "png_compression": 1,
            "writer_threads": config_dict.placeholder(int),
        }
    )
    config.overwrite = False
    config.contact_sheet = True
    config.progress_every_s = 10.0
    # Text and latent settings: only models that take prompts (configs/sd.py) use them;
    # a pixel model refuses any other value (sdedit_jax/data/guide_inputs/text.py).
    config.prompt = config_dict.placeholder(str)
    config.negative_prompt = ""
    config.guidance_scale = config_dict.placeholder(float)
    config.latent = ml_collections.ConfigDict({"posterior": "mean", "mask_downsample": "max_pool"})
    # SDXL's micro-conditioning: every row's, unless a manifest row names its own in a
    # column of the same name (sdedit_jax/data/guide_inputs/micro.py).
    config.sdxl = ml_collections.ConfigDict(
        {
            "original_size": config_dict.placeholder(tuple),
            "crops_coords_top_left": (0, 0),
            "target_size": config_dict.placeholder(tuple),
            "aesthetic_score": 6.0,
            "negative_aesthetic_score": 2.5,
        }
    )
    if variant.quick:
        config.sampler.steps_per_unit_time = 20
    return config
