"""Command line of the SDEdit batch job (:mod:`sdedit_jax.jobs.run`).

    python -m sdedit_jax.main --config configs/default.py --workdir runs/demo
    python -m sdedit_jax.main --config configs/default.py --config.seed=3 --workdir runs/s3

A config with a ``refiner`` block (``configs/sdxl.py:base_refiner``) runs two jobs,
``<workdir>/base`` and ``<workdir>/refiner`` (:mod:`sdedit_jax.jobs.two_stage`).
Every t0 of ``config.t0s`` is a sub-job writing ``<workdir>/t0_<t0>/``
(``images/``, ``manifest.jsonl``, ``failures.jsonl``, ``throughput.jsonl``);
inputs that name their own t0 are edited once, in ``t0_per_example/``.
Re-running the same command resumes: finished and failed ids are skipped; a
different configuration is refused (see :mod:`sdedit_jax.jobs.fingerprint`).
``--dry_run`` lists what would be edited or skipped, and why, and the network
calls per image and in all, writing nothing. ``--print_config`` prints the
resolved config; ``--help`` lists every ``--config.`` field with its default.
Paths may be local or ``gs://`` (see :mod:`sdedit_jax.util.files`).
Multi-host: pass ``--distributed`` on every host (see ``launch/``).

Re-running the same command resumes; ``--retry_failed`` also tries the
inputs listed in ``failures.jsonl`` again (e.g. after fixing the files).

Exit status (the process always ends promptly with it):

* 0: every input has its output (``summary.json`` describes the workdir).
* 3: some inputs failed; each has one row in ``t0_*/failures.jsonl`` naming
  the file, the field and the reason, and every other input was edited.
* 2: configuration or startup error, found before any work: one line
  naming the field, the value and what is allowed (or the process holding
  the workdir, see :mod:`sdedit_jax.jobs.workdir_lock`; or a symbolic link in
  the workdir, which the job never writes through; or a ``ram://`` workdir,
  which would vanish with the process: in-process Python API only).
* 1: any other error: one line for storage errors (e.g. a full disk, naming
  the file), a traceback for internal errors.
* 130 / 143: interrupted by Ctrl-C / SIGTERM. The process ends at once, even
  inside a compilation: every write is atomic, so the workdir is left as
  after a ``kill -9`` and the same command resumes.

Every ending goes through ``os._exit`` after flushing output: all files are
already closed (or atomically published) by then, and skipping interpreter
shutdown avoids tf.data iterators deadlocking in their destructors and
TensorFlow/XLA threads aborting, which could otherwise hold a batch
allocation until its wall-clock limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import traceback

from sdedit_jax.util import quiet

tf = quiet.import_tensorflow()  # before anything else imports it

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from sdedit_jax.data import guide_inputs  # noqa: E402
from sdedit_jax.jobs import (  # noqa: E402
    checks,  # noqa: E402
    cluster,
    sinks,
    two_stage,
    workdir_lock,
)
from sdedit_jax.jobs.checks import ConfigError  # noqa: E402
from sdedit_jax.jobs.run import run_job  # noqa: E402
from sdedit_jax.util import cli  # noqa: E402
from sdedit_jax.util.config import resolve_config_path  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_SOME_FAILED = 0, 1, 2, 3
_DEFAULT_CONFIG = resolve_config_path("configs/default.py")
_CONFIG = cli.define_config_file(
    "config",
    _DEFAULT_CONFIG,
    "job config file, path[:variant]; configs/<name>.py works from any folder "
    "(default: configs/default.py)",
    prefix="sdedit_jax",
    moved=guide_inputs.moved_fields("input"),
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "output folder (resumable)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize()")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_RETRY_FAILED = flags.DEFINE_bool(
    "retry_failed", False, "also retry the inputs listed in failures.jsonl"
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "write nothing; list what each sub-job would edit or skip, and why"
)
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "print the resolved config (after every --config.<field>) and exit"
)


def _exit(status: int) -> None:
    """Ends the process now with ``status`` (see the module docstring for why ``os._exit``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _exit_promptly_on_signals() -> None:
    """Ctrl-C and SIGTERM end the process at once, whatever the main thread is doing.

    Python runs signal handlers only between bytecodes of the main thread,
    which may sit in an XLA compilation or a tf.data wait for many seconds. The
    C-level handler also writes the signal number to a wakeup pipe; a watcher
    thread reads it and exits.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        signum = os.read(read_fd, 1)[0]
        print(
            f"\nsdedit_jax: stopped by {signal.Signals(signum).name}; finished outputs are "
            "kept: run the same command to resume",
            file=sys.stderr,
        )
        _exit(128 + signum)

    threading.Thread(target=watch, name="exit-on-signal", daemon=True).start()


def _run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]} (settings are --config.<field>=...)")
    if _PRINT_CONFIG.value:
        cli.print_config(_CONFIG.value)
        return EXIT_OK
    checks.check_workdir_flag(_WORKDIR.value)
    config_path = flags.FLAGS["config"].config_filename.partition(":")[0]
    checks.check_model_folder(_CONFIG.value, config_path)
    tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to jax
    if _DISTRIBUTED.value:
        settings = cluster.process_settings(
            os.environ, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
        jax.distributed.initialize(**dataclasses.asdict(settings))
    staged = two_stage.is_two_stage(_CONFIG.value)
    job = two_stage.run_two_stage if staged else run_job
    result = job(
        _CONFIG.value, _WORKDIR.value, retry_failed=_RETRY_FAILED.value, dry_run=_DRY_RUN.value
    )
    if jax.process_index() == 0:
        print(json.dumps(result, indent=1))
    if _DISTRIBUTED.value:
        jax.distributed.shutdown()  # os._exit skips the atexit hook that would do it
    if result["failures"]:
        where = f"{_WORKDIR.value}/{'*/' if staged else ''}t0_*/failures.jsonl"
        print(f"{result['failures']} input(s) failed: see {where}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def main(argv: list[str]) -> None:
    quiet.quiet_logs()
    _exit_promptly_on_signals()
    try:
        status = _run(argv)
    except (ConfigError, workdir_lock.WorkdirBusy) as e:
        print(f"sdedit_jax: {e}", file=sys.stderr)
        status = EXIT_CONFIG
    except (OSError, sinks.SinkError) as e:
        print(f"sdedit_jax: error: {' '.join(str(e).split())}", file=sys.stderr)
        status = EXIT_ERROR
    except BaseException:  # noqa: BLE001 - internal error: show where, then end promptly
        traceback.print_exc()
        status = EXIT_ERROR
    _exit(status)


if __name__ == "__main__":
    parser = cli.flags_parser(
        __doc__,
        prefix="sdedit_jax",
        config_flag="config",
        config_default=_DEFAULT_CONFIG,
        moved=guide_inputs.moved_fields("input"),
    )
    app.run(main, argv=cli.resolve_config_argv(sys.argv), flags_parser=parser)
