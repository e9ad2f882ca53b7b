"""Command line of the SDEdit batch job (:mod:`sdedit_jax.job`).

    python -m sdedit_jax.main --config configs/default.py --workdir runs/demo
    python -m sdedit_jax.main --config configs/default.py --config.seed=3 --workdir runs/s3

Every t0 of ``config.t0s`` is a sub-job writing ``<workdir>/t0_<t0>/``
(``images/``, ``manifest.jsonl``, ``failures.jsonl``, ``throughput.jsonl``).
Re-running the same command resumes: finished and failed ids are skipped.
Multi-host: pass ``--distributed`` on every host (see ``launch/``).

Exit status: 0 when every input was edited, 3 when some inputs failed (listed
in the failures files and the summary), 1 on errors.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sdedit_jax.job import run_job  # noqa: E402

EXIT_SOME_FAILED = 3
_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "job config file")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "output folder (resumable)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize()")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to jax
    if _DISTRIBUTED.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    result = run_job(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=1))
    if result["failures"]:
        print(f"{result['failures']} input(s) failed: see {_WORKDIR.value}/t0_*/failures.jsonl",
              file=sys.stderr)
        sys.exit(EXIT_SOME_FAILED)


if __name__ == "__main__":
    app.run(main)
