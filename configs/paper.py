"""The SDEdit paper's settings with the published 256 px checkpoints.

    python -m sdedit_jax.main --config configs/paper.py:church_ddpm --workdir runs/church_ddpm

Variants ``<dataset>_<network>``: ``church_ddpm``, ``bedroom_ddpm``,
``celebahq_ddpm`` and ``church_ncsnpp``, ``bedroom_ncsnpp``,
``celebahq_ncsnpp``, ``ffhq_ncsnpp``. Each reads the converted model folder
``models/<checkpoint>`` of the current folder (``--config.model_dir`` to change
it; a missing one is named with the file to download and the convert command)
and edits the bundled 256 px photo guides (``sdedit_jax/assets/photos_256`` of the
installed package, from any folder: stroke
paintings, stroke edits, composites; point ``--config.input.path`` at your own
guides, same layout, or build composites with ``python -m sdedit_jax.composite``).

Weights: download one published file per variant, convert it once into the
model folder the variant reads (format auto-detected):

* ``church_ddpm`` -> ``models/ddpm-church-256``: the hub folder
  ``google/ddpm-ema-church-256`` or SDEdit's ``church_outdoor.ckpt``;
* ``bedroom_ddpm`` -> ``models/ddpm-bedroom-256``: ``google/ddpm-ema-bedroom-256``
  or SDEdit's ``bedroom.ckpt``;
* ``celebahq_ddpm`` -> ``models/ddpm-celebahq-256``: ``google/ddpm-ema-celebahq-256``
  or SDEdit's ``celeba_hq.ckpt``;
* ``church_ncsnpp`` -> ``models/ncsnpp-church-256``: ``google/ncsnpp-church-256``
  or score_sde's ``ve/church_ncsnpp_continuous/checkpoint_126``;
* ``bedroom_ncsnpp`` -> ``models/ncsnpp-bedroom-256``: ``google/ncsnpp-bedroom-256``
  or a ``checkpoint_<n>`` of score_sde's ``ve/bedroom_ncsnpp_continuous``;
* ``celebahq_ncsnpp`` -> ``models/ncsnpp-celebahq-256``: ``google/ncsnpp-celebahq-256``
  or a ``checkpoint_<n>`` of ``ve/celebahq_256_ncsnpp_continuous``;
* ``ffhq_ncsnpp`` -> ``models/ncsnpp-ffhq-256``: ``google/ncsnpp-ffhq-256``
  or a ``checkpoint_<n>`` of ``ve/ffhq_256_ncsnpp_continuous``.

SDEdit's ``.ckpt`` files are linked from the ermongroup/SDEdit README; score_sde's
Flax checkpoints from the yang-song/score_sde README (its Google Drive). A score_sde
checkpoint does not hold its network config: pass the run's preset with ``--config``
(``church``, ``bedroom``, ``celebahq_256``, ``ffhq_256``). E.g.:

    huggingface-cli download google/ddpm-ema-church-256 --local-dir downloads/ddpm-ema-church-256
    python -m sdedit_jax.convert --source downloads/ddpm-ema-church-256 \
        --out models/ddpm-church-256
    python -m sdedit_jax.main --config configs/paper.py:church_ddpm --workdir runs/church_ddpm

    # or SDEdit's own file (the same DDPM network, in ddim's key layout):
    python -m sdedit_jax.convert --source downloads/church_outdoor.ckpt --out models/ddpm-church-256

    python -m sdedit_jax.convert --source downloads/church_ncsnpp_continuous/checkpoint_126 \
        --config church --out models/ncsnpp-church-256
    python -m sdedit_jax.main --config configs/paper.py:church_ncsnpp --workdir runs/church_ncsnpp

The converted folder records the SDE the network was trained with; the job
samples that SDE:

* DDPM (VP, discrete): ancestral sampling on the model's own 1000-step linear
  beta schedule (1e-4..0.02), every discrete step (N = 1000), from t0 = 0.5
  (500 steps), K = 3 repeats: SDEdit's published command
  (``--t 500 --sample_step 3``, ermongroup/SDEdit README) with its DDPM
  posterior variance.
* NCSN++ (VE, sigma_min 0.01, sigma_max 380 church / 378 bedroom / 348
  CelebA-HQ and FFHQ, taken from the checkpoint): reverse-diffusion predictor
  and one Langevin corrector step with snr = 0.075 (score_sde's sampling
  settings for all its 256 px checkpoints), on the checkpoint's own grid of
  N = 2000 steps, from t0 = 0.5 (1000 predictor-corrector steps), K = 1.

Cost per image at 256 px: 1500 network calls (DDPM) or 2000 (NCSN++); see
BENCHMARKS.md for the per-call time. Lower ``--config.t0s`` for more
faithful, raise it for more realistic results.
"""

import ml_collections

from sdedit_jax.sampling.sampler import sampler_config
from sdedit_jax.util.config import download_hint, load_sibling, package_path

# variant: (model folder, SDE family, the published hub folder it is converted from)
VARIANTS = {
    "church_ddpm": ("models/ddpm-church-256", "ddpm", "google/ddpm-ema-church-256"),
    "bedroom_ddpm": ("models/ddpm-bedroom-256", "ddpm", "google/ddpm-ema-bedroom-256"),
    "celebahq_ddpm": ("models/ddpm-celebahq-256", "ddpm", "google/ddpm-ema-celebahq-256"),
    "church_ncsnpp": ("models/ncsnpp-church-256", "ncsnpp", "google/ncsnpp-church-256"),
    "bedroom_ncsnpp": ("models/ncsnpp-bedroom-256", "ncsnpp", "google/ncsnpp-bedroom-256"),
    "celebahq_ncsnpp": ("models/ncsnpp-celebahq-256", "ncsnpp", "google/ncsnpp-celebahq-256"),
    "ffhq_ncsnpp": ("models/ncsnpp-ffhq-256", "ncsnpp", "google/ncsnpp-ffhq-256"),
}
SAMPLERS = {
    "ddpm": {
        "predictor": "ancestral",
        "corrector": "none",
        "steps_per_unit_time": 1000,
        "repeats": 3,
    },
    "ncsnpp": {
        "predictor": "reverse_diffusion",
        "corrector": "langevin",
        "steps_per_unit_time": 2000,
        "repeats": 1,
    },
}


def missing_model(model_dir: str) -> str | None:
    """How to make a variant's missing model folder (what the job says), else None."""
    return download_hint(model_dir, {folder: hub for folder, _, hub in VARIANTS.values()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/paper.py: variant {arg!r} unknown (known: {sorted(VARIANTS)})")
    model_dir, family, _ = VARIANTS[arg]
    sampler = dict(SAMPLERS[family])
    # The demo job's config (every field the job reads, e.g. output) with the paper's settings.
    config = load_sibling(__file__, "default").get_config()
    config.model_dir = model_dir
    config.input.path = package_path("assets", "photos_256")
    config.input.image_size = (256, 256)
    config.t0s = (0.5,)
    config.repeats = sampler.pop("repeats")
    config.sampler = sampler_config(**sampler, snr=0.075)
    config.per_device_batch = 4
    return config
