"""The compiled JAX edit program vs an eager PyTorch port: same weights, batch, steps, t0.

    python -m sdedit_jax.tools.bench_torch --random_arch=configs/train_emoji.py \
        --batch=16 --steps=20 --timing_repeats=2

Prints images/s of both and their ratio (needs torch installed). ``--model_dir``
picks a model folder (default: the shipped model); with ``--random_arch`` a
randomly initialised network of that train config's architecture is timed instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import TYPE_CHECKING

from sdedit_jax.util import quiet  # noqa: E402

quiet.import_tensorflow()  # before anything else imports it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sdedit_jax import engine, pretrained  # noqa: E402
from sdedit_jax.sampling.sampler import Sampler  # noqa: E402
from sdedit_jax.tools import bench_inputs  # noqa: E402
from sdedit_jax.tools.bench_inputs import (  # noqa: E402
    per_device_rows,
    random_batch,
)
from sdedit_jax.tools.timing import timed  # noqa: E402

if TYPE_CHECKING:
    from sdedit_jax.tools.torch_baseline import EditBaseline

_BATCH = flags.DEFINE_integer("batch", 64, "global batch")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 0, "0 -> batch / devices")
_STEPS = flags.DEFINE_integer("steps", 100, "reverse steps per edit")
_REPEATS = flags.DEFINE_integer("timing_repeats", 3, "timed runs (best is reported)")


def bench_torch(model: pretrained.LoadedModel, steps: int, per_device: int, repeats: int) -> dict:
    """The compiled JAX edit vs an eager PyTorch port on the same weights, guides, t0 and steps.

    Both run plain SDEdit (no mask, so no per-step projection) with
    Euler-Maruyama. Runs are interleaved so that load from other processes
    hits both alike; the best of ``repeats`` is reported. PyTorch is timed in
    both memory formats with torch's default thread count (the baseline: one
    thread per core, like XLA) and, on a shared machine where OpenMP threads
    contend, also single-threaded.
    """
    # torch is an optional dependency: only the torch benchmarks import it.
    import torch

    from sdedit_jax.tools import torch_baseline

    editor = engine.Editor(model.sde, Sampler(max_steps=steps), per_device_batch=per_device)
    placed = editor.place_score(model.score_fn)
    host_batch = dataclasses.replace(random_batch(model, editor.global_batch, steps), mask=None)
    batch = editor.shard(host_batch)
    baseline = torch_baseline.EditBaseline(model, host_batch.guides, host_batch.t0)
    threads = torch.get_num_threads()

    def run_torch(memory_format, num_threads):
        torch.set_num_threads(num_threads)
        return baseline.edit(memory_format, steps)

    formats = torch_baseline.MEMORY_FORMATS
    runs = {"jax": lambda: editor.run_global(placed, batch).block_until_ready()}
    runs.update({f"torch_{name}": functools.partial(run_torch, name, threads) for name in formats})
    if threads > 1:
        runs["torch_channels_last_1thread"] = functools.partial(run_torch, "channels_last", 1)
    first_call_s = {name: timed(run) for name, run in runs.items()}
    best_s = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best_s[name] = min(best_s[name], timed(run))
    torch.set_num_threads(threads)
    rows = editor.global_batch
    same_threads = min((f"torch_{name}" for name in formats), key=best_s.get)
    fastest_torch = min((name for name in runs if name != "jax"), key=best_s.get)
    score_diff, score_scale = _torch_score_difference(model, baseline, host_batch)
    return {
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "global_batch": rows,
        "steps": steps,
        "t0": float(host_batch.t0[0]),
        "predictor": "euler_maruyama",
        "torch_version": torch.__version__,
        "torch_threads": threads,
        # XLA:CPU sizes its intra-op thread pool to the schedulable cores; no flag changes it here.
        "schedulable_cpus": len(os.sched_getaffinity(0)),
        "score_max_abs (jax, t=t0)": score_scale,
        "score_max_abs_diff (jax vs torch)": score_diff,
        "jax_first_call_s (compile+run)": round(first_call_s["jax"], 2),
        **{f"{name}_run_s": round(best, 3) for name, best in best_s.items()},
        **{f"{name}_images_per_s": round(rows / best, 2) for name, best in best_s.items()},
        "torch_baseline (same threads, faster format)": same_threads,
        "jax_over_torch_ratio": round(best_s[same_threads] / best_s["jax"], 2),
        "jax_over_fastest_torch_ratio": round(best_s[fastest_torch] / best_s["jax"], 2),
    }


def _torch_score_difference(
    model: pretrained.LoadedModel, baseline: EditBaseline, host_batch: engine.EditBatch
) -> tuple[float, float]:
    """Max |score_jax - score_torch| on the benchmark guides, and max |score_jax| for scale."""
    import torch

    from sdedit_jax.tools import torch_baseline

    jax_score = np.asarray(
        jax.jit(lambda s, x, t: s(x, t))(
            model.score_fn, jnp.asarray(host_batch.guides), jnp.asarray(host_batch.t0)
        )
    )
    net = baseline.nets["nchw"]
    schedule = torch_baseline.edit_schedule(model.sde, net.cfg.time_embedding, host_batch.t0, 1)
    with torch.no_grad():
        out = net(baseline.guides, schedule.cond[0])
        torch_score = torch_baseline.output_to_score(
            out, schedule.inv_std[0], model.parameterization
        )
    diff = np.max(np.abs(jax_score - torch_score.permute(0, 2, 3, 1).numpy()))
    return float(diff), float(np.max(np.abs(jax_score)))


def main(argv: list[str]) -> None:
    quiet.quiet_logs()
    del argv
    per_device = per_device_rows(_BATCH.value, _PER_DEVICE.value)
    with bench_inputs.model_from_flags() as (
        model,
        _,
    ):
        result = bench_torch(model, _STEPS.value, per_device, _REPEATS.value)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
