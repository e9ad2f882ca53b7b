"""The end-to-end job (tf.data input, sharded steps, PNG/manifest writes) vs the bare program.

    python -m sdedit_jax.tools.bench_job --num_guides=256 --steps=50

Both run the same batch shapes and steps; the ratio says what the job's I/O costs.
``--model_dir`` picks a model folder (default: the shipped model); with
``--random_arch=configs/train_emoji.py`` a randomly initialised network of that
config's architecture is timed instead.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from sdedit_jax.util import quiet  # noqa: E402
from sdedit_jax.util.config import load_config  # noqa: E402

quiet.import_tensorflow()  # before anything else imports it

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from sdedit_jax import engine, pretrained  # noqa: E402
from sdedit_jax.jobs import run as job  # noqa: E402
from sdedit_jax.sampling.sampler import Sampler, sampler_from_config  # noqa: E402
from sdedit_jax.tools import bench_inputs  # noqa: E402
from sdedit_jax.tools.bench_inputs import random_batch  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 100, "reverse steps per edit")
_NUM_GUIDES = flags.DEFINE_integer("num_guides", 256, "guides the job edits")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 8, "rows per device")


def _job_config(model_dir: str, per_device: int, steps: int) -> ml_collections.ConfigDict:
    config = load_config("configs/default.py")
    config.model_dir = model_dir
    config.t0s = (0.5,)
    config.sampler.steps_per_unit_time = 0
    config.sampler.n_steps = steps
    config.per_device_batch = per_device
    config.contact_sheet = False
    return config


def time_pure_program(
    model: pretrained.LoadedModel, sampler: Sampler, per_device: int, steps: int, num_batches: int
) -> float:
    """Seconds for ``num_batches`` compiled edits on one device-resident batch (no I/O)."""
    editor = engine.Editor(model.sde, sampler, per_device_batch=per_device)
    placed = editor.place_score(model.score_fn)
    batch = editor.shard(random_batch(model, editor.global_batch, steps))
    editor.run_global(placed, batch).block_until_ready()
    start = time.perf_counter()
    jax.block_until_ready([editor.run_global(placed, batch) for _ in range(num_batches)])
    return time.perf_counter() - start


def bench_job(
    model: pretrained.LoadedModel, model_dir: str, steps: int, num_guides: int, per_device: int
) -> dict:
    """End-to-end job vs the bare compiled program on identical batch shapes and steps.

    The bare program is timed before and after the job and the faster run
    counts, so background load can only make the reported ratio smaller.
    """
    config = _job_config(model_dir, per_device, steps)
    sampler, _ = sampler_from_config(config.sampler)
    global_batch = jax.device_count() * per_device
    timed_batches = -(-num_guides // global_batch) - 1  # the job's first batch compiles
    pure_before = time_pure_program(model, sampler, per_device, steps, timed_batches)
    with tempfile.TemporaryDirectory() as tmp:
        guides = os.path.join(tmp, "guides")
        os.makedirs(guides)
        pixel_rng = np.random.default_rng(0)
        for i in range(num_guides):
            pixels = pixel_rng.integers(0, 256, (model.image_size, model.image_size, 3), np.uint8)
            Image.fromarray(pixels).save(os.path.join(guides, f"{i:06d}.png"))
        config.input.path = guides
        config.input.image_size = (model.image_size, model.image_size)
        # This run's timings (the summary's own "sub_jobs" holds totals over runs).
        result = job.run_job(config, os.path.join(tmp, "out"))["this_run"]["sub_jobs"][0]
    pure_after = time_pure_program(model, sampler, per_device, steps, timed_batches)
    pure_s = min(pure_before, pure_after)
    job_s = result["seconds"] - result["first_batch_seconds"]
    job_rate = timed_batches * global_batch / job_s
    pure_rate = timed_batches * global_batch / pure_s
    return {
        "devices": jax.device_count(),
        "global_batch": global_batch,
        "steps": steps,
        "guides": num_guides,
        "timed_batches": timed_batches,
        "job_images_per_s (after first batch)": round(job_rate, 2),
        "pure_program_images_per_s": round(pure_rate, 2),
        "job_over_pure_ratio": round(job_rate / pure_rate, 3),
    }


def main(argv: list[str]) -> None:
    quiet.quiet_logs()
    del argv
    with bench_inputs.model_from_flags() as (
        model,
        folder,
    ):
        result = bench_job(model, folder, _STEPS.value, _NUM_GUIDES.value, _PER_DEVICE.value)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
