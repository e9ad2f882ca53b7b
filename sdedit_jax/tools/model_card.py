"""Packages a training run as a shippable model folder with its evidence.

    python -m sdedit_jax.tools.model_card --train_workdir runs/emoji_default \
        --out sdedit_jax/assets/default_model

Copies the EMA weights (fp32) and ``model_info.json``, keeps the training log
(``training_log.jsonl``) and draws ``loss_curve.png`` and ``samples.png``:
unconditional samples from the full reverse SDE, i.e. SDEdit of an all-zero
guide at t0 = T = 1 (its forward kernel at T is N(0, s(1)^2), the prior up to
s(1)^2 = 1 - 4e-5 for VP, exactly the prior for VE).
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from sdedit_jax import engine, pretrained  # noqa: E402
from sdedit_jax.data import image_grid  # noqa: E402
from sdedit_jax.util import files  # noqa: E402

_TRAIN_WORKDIR = flags.DEFINE_string("train_workdir", "runs/emoji_default", "training workdir")
_OUT = flags.DEFINE_string("out", "sdedit_jax/assets/default_model", "model folder to write")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "unconditional samples to draw")
_STEPS = flags.DEFINE_integer("steps", 500, "reverse steps from T to eps for the samples")


def copy_model(train_workdir: str, out: str) -> dict:
    """Copies fp32 EMA weights + info (info lists only the shipped file's checksum)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(train_workdir, pretrained.INFO_FILE)) as f:
        info = json.load(f)
    weights = pretrained.WEIGHT_FILES[0]
    shutil.copyfile(os.path.join(train_workdir, weights), os.path.join(out, weights))
    digest = files.sha256(os.path.join(out, weights))
    if digest != info["sha256"][weights]:
        raise ValueError(f"{train_workdir}/{weights}: checksum differs from model_info.json")
    info["sha256"] = {weights: digest}
    with open(os.path.join(out, pretrained.INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)
    shutil.copyfile(
        os.path.join(train_workdir, "metrics.jsonl"), os.path.join(out, "training_log.jsonl")
    )
    return info


def plot_loss_curve(log_path: str, out_png: str) -> None:
    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=110)
    axis.plot(steps, [r["loss"] for r in rows], lw=1)
    axis.set_xlabel("step")
    axis.set_ylabel("DSM loss (mean over window)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_png)
    plt.close(figure)


def draw_samples(model_dir: str, count: int, steps: int, seed: int = 0) -> np.ndarray:
    model = pretrained.load_model(model_dir)
    shape = (count, model.image_size, model.image_size, model.num_channels)
    out = engine.sdedit(
        model.score_fn,
        model.sde,
        np.zeros(shape, np.float32),
        seed=seed,
        t0=model.sde.T,
        n_steps=steps,
        per_device_batch=count,
    )
    return np.clip(np.asarray(out), -1.0, 1.0)


def main(argv):
    del argv
    info = copy_model(_TRAIN_WORKDIR.value, _OUT.value)
    plot_loss_curve(
        os.path.join(_OUT.value, "training_log.jsonl"), os.path.join(_OUT.value, "loss_curve.png")
    )
    samples = draw_samples(_OUT.value, _NUM_SAMPLES.value, _STEPS.value)
    rows = [list(samples[i : i + 8]) for i in range(0, len(samples), 8)]
    image_grid.contact_sheet(rows, [""] * 8, cell=64).save(os.path.join(_OUT.value, "samples.png"))
    print(f"wrote {_OUT.value}: step {info.get('step')}, {len(samples)} samples")


if __name__ == "__main__":
    app.run(main)
