"""Test setup: 8 simulated CPU devices, a persistent compilation cache, and jax's
in-memory caches cleared between test files when the process nears its mapping limit.

XLA_FLAGS must be set before jax is imported anywhere, hence at module top. Each
compiled CPU program keeps its code in memory mappings of its own for as long as jax
caches it; over the whole suite they passed Linux's default limit of 65,530 mappings
per process (``vm.max_map_count``) and XLA aborted in the middle of a compile at
about 97 %. Clearing the caches releases them (programs come back from the
persistent cache); doing it only past a third of the limit keeps the programs that
later files share (clearing after every file made the suite 40 % slower).
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


import gc  # noqa: E402

import pytest  # noqa: E402

MAPPINGS_BEFORE_CLEARING = 22_000  # of the kernel's 65,530; one file adds up to ~20,000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to keep under
        return 0


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After a file, drops every compiled program (and its code mappings) if the process
    holds more than :data:`MAPPINGS_BEFORE_CLEARING` mappings."""
    yield
    if _mappings() > MAPPINGS_BEFORE_CLEARING:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """One random tiny model folder (16 px RGB U-Net, VP, noise prediction) for the session.

    Tests only read it, so the job, evaluation and bad-input tests share one folder
    instead of each building and saving its own.
    """
    from tests import job_cli

    return job_cli.make_model(str(tmp_path_factory.mktemp("tiny_model")))
