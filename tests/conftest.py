"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, hence at module top.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tf.data must not grab an accelerator

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("SDEDIT_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """One random tiny model folder (16 px RGB U-Net, VP, noise prediction) for the session.

    Tests only read it, so the job, evaluation and bad-input tests share one folder
    instead of each building and saving its own.
    """
    from tests import job_cli

    return job_cli.make_model(str(tmp_path_factory.mktemp("tiny_model")))
