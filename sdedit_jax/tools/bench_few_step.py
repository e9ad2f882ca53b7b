"""Images/s at equal quality: few-step JAX solvers vs the paper's recipe in eager PyTorch.

    python -m sdedit_jax.tools.bench_few_step --batch=16 --timing_repeats=1 \
        --settings=dpm_solver_2m:10,sde_dpm_solver_2m:20

The recipe is N = 1000 at t0 = 0.5: 500 steps (``--recipe_steps``). Needs torch
installed. ``--model_dir`` picks a model folder (default: the shipped model);
with ``--random_arch`` a randomly initialised network of that train config's
architecture is timed instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from sdedit_jax.util import quiet  # noqa: E402

quiet.import_tensorflow()  # before anything else imports it

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sdedit_jax import engine, pretrained  # noqa: E402
from sdedit_jax.sampling.sampler import Sampler  # noqa: E402
from sdedit_jax.sampling.steps import step_bucket  # noqa: E402
from sdedit_jax.tools import bench_inputs  # noqa: E402
from sdedit_jax.tools.bench_inputs import (  # noqa: E402
    per_device_rows,
    random_batch,
)
from sdedit_jax.tools.timing import timed  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 64, "global batch")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 0, "0 -> batch / devices")
_SETTINGS = flags.DEFINE_list(
    "settings", ["dpm_solver_2m:10", "sde_dpm_solver_2m:20"], "JAX settings predictor:steps"
)
_RECIPE_STEPS = flags.DEFINE_integer(
    "recipe_steps", 500, "PyTorch steps of the paper's recipe (N=1000, t0=0.5)"
)
_TIME_GRID = flags.DEFINE_string("time_grid", "", "time grid ('' = the predictor's default)")
_REPEATS = flags.DEFINE_integer("timing_repeats", 3, "timed runs (best is reported)")


def parse_settings(items: list[str]) -> list[tuple[str, int]]:
    """``["predictor:steps", ...]`` -> ``[(predictor, steps), ...]``."""
    settings = []
    for item in items:
        predictor, sep, steps = item.partition(":")
        if not sep or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--settings: expected predictor:steps, got {item!r}")
        settings.append((predictor, int(steps)))
    return settings


def bench_few_step(
    model: pretrained.LoadedModel,
    settings: list[tuple[str, int]],
    recipe_steps: int,
    time_grid: str,
    per_device: int,
    repeats: int,
) -> dict:
    """Images/s at equal quality: few-step JAX solvers vs the paper's recipe in PyTorch.

    Each of ``settings`` (``(predictor, steps)``) runs as a compiled JAX
    program; the eager PyTorch baseline runs ``recipe_steps`` uniform
    reverse-SDE steps (the paper's N = 1000 at t0 = 0.5: 500 steps), and so
    does JAX's ancestral sampler (the recipe itself). The PyTorch port has
    Euler-Maruyama steps; the recipe's ancestral steps make the same one
    network call per step and differ by a few elementwise operations, so its
    time is the recipe's. Same weights, guides, batch and t0; runs are
    interleaved, best of ``repeats``, PyTorch in its faster memory format.
    """
    # torch is an optional dependency: only the torch benchmarks import it.
    import torch

    from sdedit_jax.tools import torch_baseline

    settings = [*settings, ("ancestral", recipe_steps)]
    editors = {
        f"jax_{p}@{n}": (
            engine.Editor(
                model.sde,
                Sampler(p, max_steps=step_bucket(n), time_grid=time_grid),
                per_device_batch=per_device,
            ),
            n,
        )
        for p, n in settings
    }
    rows = next(iter(editors.values()))[0].global_batch
    host_batch = dataclasses.replace(random_batch(model, rows, 1), mask=None)
    baseline = torch_baseline.EditBaseline(model, host_batch.guides, host_batch.t0)
    formats = torch_baseline.MEMORY_FORMATS
    for name in formats:  # warm-up (oneDNN primitive creation), untimed
        baseline.edit(name, 2)

    def jax_run(editor, steps):
        placed = editor.place_score(model.score_fn)
        batch = editor.shard(
            dataclasses.replace(host_batch, n_steps=np.full(rows, steps, np.int32))
        )
        editor.run_global(placed, batch).block_until_ready()  # compiles
        return lambda: editor.run_global(placed, batch).block_until_ready()

    runs = {name: jax_run(editor, steps) for name, (editor, steps) in editors.items()}
    runs.update(
        {f"torch_{name}": functools.partial(baseline.edit, name, recipe_steps) for name in formats}
    )
    best_s = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best_s[name] = min(best_s[name], timed(run))
    torch_name = min((f"torch_{name}" for name in formats), key=best_s.get)
    result = {
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "global_batch": rows,
        "t0": float(host_batch.t0[0]),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_recipe": f"{recipe_steps} uniform reverse-SDE steps ({torch_name})",
        "torch_recipe_images_per_s": round(rows / best_s[torch_name], 3),
    }
    for name, (editor, steps) in editors.items():
        nfe = steps * editor.sampler.nfe_per_step
        result[name] = {
            "grid": editor.sampler.grid_name,
            "nfe_per_image": nfe,
            "images_per_s": round(rows / best_s[name], 3),
            "over_torch_recipe": round(best_s[torch_name] / best_s[name], 2),
        }
    return result


def main(argv: list[str]) -> None:
    quiet.quiet_logs()
    del argv
    settings = parse_settings(_SETTINGS.value)
    per_device = per_device_rows(_BATCH.value, _PER_DEVICE.value)
    with bench_inputs.model_from_flags() as (
        model,
        _,
    ):
        result = bench_few_step(
            model, settings, _RECIPE_STEPS.value, _TIME_GRID.value, per_device, _REPEATS.value
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
