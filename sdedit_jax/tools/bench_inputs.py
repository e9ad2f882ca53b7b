"""What the edit-program benchmarks run on: a model, a random batch, one score call's FLOPs.

Shared by ``bench_sampler``, ``bench_job``, ``bench_torch`` and ``bench_few_step`` so
that every benchmark times the same model on the same kind of batch.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from sdedit_jax import engine, pretrained
from sdedit_jax.models import unet
from sdedit_jax.rng import string_id_words
from sdedit_jax.util.config import load_config

# The model flags of every edit-program benchmark's command line.
MODEL_DIR = flags.DEFINE_string("model_dir", "default", "model folder")
RANDOM_ARCH = flags.DEFINE_string("random_arch", "", "train config: time a random network")


@contextlib.contextmanager
def benchmark_model(
    model_dir: str, random_arch: str = ""
) -> Iterator[tuple[pretrained.LoadedModel, str]]:
    """``(model, folder)`` to time: ``model_dir``, or a random network of ``random_arch``.

    ``random_arch`` names a train config; a randomly initialised network of its
    architecture (same cost as trained weights, none needed) is saved to a scratch
    folder that lives as long as the context.
    """
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_dir
        if random_arch:
            config = load_config(random_arch)
            _, state = nnx.split(unet.build(unet.UNetConfig.from_config(config.model), 0))
            pretrained.save_model(
                scratch,
                state,
                config.model.to_dict(),
                config.sde.to_dict(),
                config.training.parameterization,
            )
            folder = scratch
        yield pretrained.load_model(folder), folder


def model_from_flags() -> contextlib.AbstractContextManager[tuple[pretrained.LoadedModel, str]]:
    """:func:`benchmark_model` of ``--model_dir`` / ``--random_arch``."""
    return benchmark_model(MODEL_DIR.value, RANDOM_ARCH.value)


def per_device_rows(batch: int, per_device: int = 0) -> int:
    """Rows per device: ``per_device``, or ``batch`` split over the devices when it is 0."""
    return per_device or max(1, batch // jax.device_count())


def random_batch(
    model: pretrained.LoadedModel, rows: int, steps: int, seed: int = 0
) -> engine.EditBatch:
    """``rows`` uniform random guides at t0 = 0.5 with ``steps`` steps and a full mask."""
    rng = np.random.default_rng(seed)
    shape = (rows, model.image_size, model.image_size, model.num_channels)
    return engine.EditBatch(
        guides=rng.uniform(-1, 1, shape).astype(np.float32),
        seeds=np.zeros(rows, np.int32),
        id_words=string_id_words([str(i) for i in range(rows)]),
        t0=np.full(rows, 0.5, np.float32),
        n_steps=np.full(rows, steps, np.int32),
        mask=np.ones(shape[:3] + (1,), np.float32),
    )


def score_flops(model: pretrained.LoadedModel, rows: int) -> float:
    """FLOPs of one score evaluation of ``rows`` images, from XLA's cost analysis."""
    x = jnp.zeros((rows, model.image_size, model.image_size, model.num_channels))
    t = jnp.full((rows,), 0.5)
    compiled = jax.jit(lambda s, x, t: s(x, t)).lower(model.score_fn, x, t).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])
