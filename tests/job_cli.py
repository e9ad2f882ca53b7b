"""Helpers for tests that run the batch job as users do: ``python -m sdedit_jax.main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from flax import nnx
from PIL import Image

from sdedit_jax import pretrained
from sdedit_jax.models import unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
TINY_MODEL = dict(
    image_size=SIZE,
    num_channels=3,
    nf=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    dropout=0.0,
    time_embedding="sinusoidal",
    fourier_scale=16.0,
    skip_rescale=True,
    fast_conv=True,
)


def make_model(path: str) -> str:
    """A random tiny model folder (16 px, RGB) saved with the project's own writer."""
    _, state = nnx.split(unet.build(unet.UNetConfig.from_config(TINY_MODEL), seed=1))
    pretrained.save_model(path, state, TINY_MODEL, {"name": "vp"}, "noise")
    return path


def save_png(path: str, pixels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def random_guide(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)


def command(
    model_dir: str,
    source: str,
    workdir: str,
    *extra: str,
    t0s: str = "(0.4,0.6)",
    image_size: str = f"({SIZE},{SIZE})",
) -> list[str]:
    """The job's command line for ``source`` (a folder, or a .jsonl/.csv manifest).

    Tuple settings are parameters: given twice on a command line, ml_collections
    concatenates them instead of replacing the first.
    """
    kind = "manifest" if source.endswith((".jsonl", ".csv")) else "folder"
    return [
        sys.executable,
        "-m",
        "sdedit_jax.main",
        "--config",
        "configs/default.py",
        f"--config.model_dir={model_dir}",
        f"--config.input.source={kind}",
        f"--config.input.path={source}",
        f"--config.input.image_size={image_size}",
        f"--config.t0s={t0s}",
        "--config.sampler.steps_per_unit_time=10",
        "--config.per_device_batch=2",
        f"--workdir={workdir}",
        *extra,
    ]


def env(devices: int = 2, tmpdir: str | None = None) -> dict[str, str]:
    out = dict(os.environ)
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out["JAX_COMPILATION_CACHE_DIR"] = os.path.join(REPO, ".jax_cache")
    out["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if tmpdir is not None:
        out["TMPDIR"] = tmpdir
    return out


def run(
    cmd: list[str], *, devices: int = 2, tmpdir: str | None = None, timeout: float = 300, **kwargs
) -> subprocess.CompletedProcess:
    """Runs the command under a timeout (a hang fails the test with TimeoutExpired)."""
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=env(devices, tmpdir),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def rows(path: str) -> dict[str, dict]:
    """JSONL rows of a finished manifest or failures file, by id."""
    with open(path, encoding="utf-8") as f:
        return {row["id"]: row for row in map(json.loads, f)}


def error_lines(stderr: str) -> list[str]:
    """The job's own messages (TensorFlow/XLA start-up chatter removed)."""
    noise = (
        "oneDNN",
        "absl::InitializeLog",
        "libtpu",
        "xla_bridge",
        "cpu_feature_guard",
        "To enable the following instructions",
    )
    return [
        line for line in stderr.splitlines() if line.strip() and not any(n in line for n in noise)
    ]


# A tiny diffusers UNet2DModel of the NCSN++ family (score_sde's layout) at SIZE.
TINY_NCSNPP_DIFFUSERS = {
    "sample_size": SIZE,
    "block_out_channels": [32, 128],
    "layers_per_block": 1,
    "down_block_types": ["SkipDownBlock2D", "AttnSkipDownBlock2D"],
    "up_block_types": ["AttnSkipUpBlock2D", "SkipUpBlock2D"],
    "time_embedding_type": "fourier",
    "center_input_sample": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.41421356237,
    "norm_eps": 1e-6,
    "norm_num_groups": None,
    "attention_head_dim": None,
    "act_fn": "silu",
}


def photo_guides(folder, side: int, names=None) -> None:
    """The bundled photo guides (or ``names`` of them) and their masks at ``side`` px in
    ``folder`` (masks thresholded at 128 after a nearest resize)."""
    from sdedit_jax.util.config import package_path

    source = package_path("assets", "photos_256")
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    for name in names or sorted(n for n in os.listdir(source) if n.endswith(".png")):
        image = Image.open(os.path.join(source, name)).convert("RGB")
        image.resize((side, side), Image.BICUBIC).save(os.path.join(folder, name))
        mask_path = os.path.join(source, "masks", name)
        if os.path.exists(mask_path):
            mask = Image.open(mask_path).convert("L").resize((side, side), Image.NEAREST)
            mask.point(lambda v: 255 if v >= 128 else 0).save(os.path.join(folder, "masks", name))
