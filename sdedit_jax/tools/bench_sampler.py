"""The compiled edit program alone: compile time, steps/s, images/s, FLOP/s vs matmul peak.

    python -m sdedit_jax.tools.bench_sampler --batch=64 --steps=100
    # The same program compiled under each XLA:CPU option set (timing.XLA_CPU_OPTIONS),
    # one lowering, calls interleaved: images/s per set and its ratio to the first.
    python -m sdedit_jax.tools.bench_sampler --batch=64 --steps=20 \
        --xla_options=default,no_ynnpack,onednn_dot

``--model_dir`` picks a model folder (default: the shipped model); with
``--random_arch=configs/train_emoji.py`` a randomly initialised network of that
config's architecture is timed instead (same cost, no weights needed).
"""

from __future__ import annotations

import json

from sdedit_jax.util import quiet  # noqa: E402

quiet.import_tensorflow()  # before anything else imports it

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sdedit_jax import engine, pretrained  # noqa: E402
from sdedit_jax.sampling.sampler import Sampler  # noqa: E402
from sdedit_jax.tools import bench_inputs  # noqa: E402
from sdedit_jax.tools.bench_inputs import (  # noqa: E402
    per_device_rows,
    random_batch,
    score_flops,
)
from sdedit_jax.tools.timing import (  # noqa: E402
    XLA_CPU_OPTIONS,
    cpu_model_name,
    matmul_peak_flops,
    timed,
)

_BATCH = flags.DEFINE_integer("batch", 64, "global batch")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 0, "0 -> batch / devices")
_STEPS = flags.DEFINE_integer("steps", 100, "reverse steps per edit")
_PREDICTOR = flags.DEFINE_string("predictor", "euler_maruyama", "predictor")
_CORRECTOR = flags.DEFINE_string("corrector", "none", "corrector")
_TIME_GRID = flags.DEFINE_string("time_grid", "", "time grid ('' = the predictor's default)")
_REPEATS = flags.DEFINE_integer("timing_repeats", 3, "timed runs (best is reported)")
_XLA_OPTIONS = flags.DEFINE_list(
    "xla_options",
    [],
    "keys of XLA_CPU_OPTIONS: compile the program under each and time them side by side",
)


def _placed_program(model: pretrained.LoadedModel, sampler: Sampler, per_device: int, steps: int):
    """``(editor, placed score, sharded random batch)`` of one edit program."""
    editor = engine.Editor(model.sde, sampler, per_device_batch=per_device)
    placed = editor.place_score(model.score_fn)
    batch = editor.shard(random_batch(model, editor.global_batch, steps))
    return editor, placed, batch


def bench_sampler(
    model: pretrained.LoadedModel, sampler: Sampler, steps: int, per_device: int, repeats: int
) -> dict:
    """Compile time and throughput of one edit program; the best of ``repeats`` runs."""
    editor, placed, batch = _placed_program(model, sampler, per_device, steps)
    compile_s = timed(lambda: editor.lower(placed, batch).compile())
    editor.run_global(placed, batch).block_until_ready()
    run_s = min(
        timed(lambda: editor.run_global(placed, batch).block_until_ready()) for _ in range(repeats)
    )
    evals = steps * sampler.nfe_per_step
    flops_per_eval = score_flops(model, editor.global_batch)
    peak = matmul_peak_flops()
    achieved = flops_per_eval * evals / run_s
    return {
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "global_batch": editor.global_batch,
        "steps": steps,
        "predictor": sampler.predictor,
        "corrector": sampler.corrector,
        "time_grid": sampler.grid_name,
        "nfe_per_example": evals,
        "compile_s (trace+lower+compile)": round(compile_s, 2),
        "run_s": round(run_s, 3),
        "steps_per_s": round(steps / run_s, 2),
        "images_per_s": round(editor.global_batch / run_s, 2),
        "model_calls_per_s (batched)": round(evals / run_s, 2),
        "image_evals_per_s": round(evals * editor.global_batch / run_s, 1),
        "gflop_per_image_eval": round(flops_per_eval / editor.global_batch / 1e9, 4),
        "achieved_gflop_per_s": round(achieved / 1e9, 2),
        "matmul_peak_gflop_per_s": round(peak / 1e9, 2),
        "fraction_of_matmul_peak": round(achieved / peak, 3),
    }


def compare_xla_options(
    model: pretrained.LoadedModel,
    sampler: Sampler,
    steps: int,
    per_device: int,
    xla_options: list[str],
    repeats: int,
) -> dict:
    """The edit program compiled under each of ``xla_options``, side by side.

    One lowering, one compile per option set, calls interleaved, best of
    ``repeats``: images/s per set and its ratio to the first set.
    """
    unknown = sorted(set(xla_options) - set(XLA_CPU_OPTIONS))
    if unknown:
        raise ValueError(f"--xla_options: unknown {unknown}; known {sorted(XLA_CPU_OPTIONS)}")
    editor, placed, batch = _placed_program(model, sampler, per_device, steps)
    lowered = editor.lower(placed, batch)
    _, arrays = placed
    args = (arrays, batch.guides, batch.seeds, batch.id_words, batch.t0, batch.n_steps, batch.mask)
    compiled = {o: lowered.compile(compiler_options=XLA_CPU_OPTIONS[o]) for o in xla_options}
    outputs = {o: np.asarray(c(*args)) for o, c in compiled.items()}  # also warms up
    first = xla_options[0]
    best = {o: float("inf") for o in compiled}
    for _ in range(repeats):
        for o, c in compiled.items():
            best[o] = min(best[o], timed(lambda c=c: c(*args).block_until_ready()))
    rows = editor.global_batch
    return {
        "cpu": cpu_model_name(),
        "devices": jax.device_count(),
        "global_batch": rows,
        "steps": steps,
        "predictor": sampler.predictor,
        "max_abs_diff_vs_first": {
            o: float(np.max(np.abs(v - outputs[first]))) for o, v in outputs.items()
        },
        "images_per_s": {o: round(rows / b, 2) for o, b in best.items()},
        f"speedup_over_{first}": {o: round(best[first] / b, 3) for o, b in best.items()},
    }


def main(argv: list[str]) -> None:
    quiet.quiet_logs()
    del argv
    sampler = Sampler(
        _PREDICTOR.value, _CORRECTOR.value, max_steps=_STEPS.value, time_grid=_TIME_GRID.value
    )
    per_device = per_device_rows(_BATCH.value, _PER_DEVICE.value)
    with bench_inputs.model_from_flags() as (
        model,
        _,
    ):
        if _XLA_OPTIONS.value:
            result = compare_xla_options(
                model, sampler, _STEPS.value, per_device, _XLA_OPTIONS.value, _REPEATS.value
            )
        else:
            result = bench_sampler(model, sampler, _STEPS.value, per_device, _REPEATS.value)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
