"""Which devices each process of a multi-process job drives (SLURM, TPU pods, explicit flags).

Why: ``jax.distributed.initialize()`` under SLURM binds each process to one GPU
(its ``SLURM_LOCALID``). With one task per node that is GPU 0 of 8; the job
would silently use an eighth of the machine. The decision is made here, from
the environment, by one pure function that the launch scripts and
``python -m sdedit_jax.main --distributed`` share, and that tests check by
simulating the variables SLURM sets.

Rules (:func:`slurm_settings`):

* one task per node: the process drives every local GPU (``local_device_ids``
  None);
* several tasks per node (``launch/slurm_gpu.sbatch``: one per GPU): task
  ``SLURM_LOCALID`` drives GPU ``SLURM_LOCALID``, or GPU 0 when SLURM already
  narrowed ``CUDA_VISIBLE_DEVICES`` to the task's own GPU (``--gpus-per-task``
  or ``--gpu-bind``); ``SDEDIT_LOCAL_DEVICE_IDS=0,1`` overrides both.
* The coordinator is the first node of the step's node list, port
  ``SDEDIT_COORDINATOR_PORT`` or one derived from the job id, so every task
  computes the same address without talking to the others.

``python -m sdedit_jax.jobs.cluster`` prints this process's settings as JSON (the
SLURM script logs them for every task before the job starts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """Arguments of ``jax.distributed.initialize`` for this process (None = let jax decide)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: list[int] | None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[017-018,020],cpu1`` -> ``gpu017``)."""
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(2)
    if not prefix and not ranges:
        raise ValueError(f"SLURM node list {nodelist!r}: no host")
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ValueError(f"{name}: not set (is this process started by srun?)") from None
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {env[name]!r}") from None


def tasks_per_node(env: Mapping[str, str]) -> int:
    """Tasks on this node (``SLURM_NTASKS_PER_NODE`` such as ``8(x2)``, else ntasks / nodes)."""
    value = (
        env.get("SLURM_STEP_TASKS_PER_NODE")
        or env.get("SLURM_TASKS_PER_NODE")
        or env.get("SLURM_NTASKS_PER_NODE")
    )
    if value:
        expanded: list[int] = []
        for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", value):
            expanded += [int(count)] * int(repeat or 1)
        node = int(env.get("SLURM_NODEID", "0"))
        return expanded[min(node, len(expanded) - 1)]
    return _int(env, "SLURM_NTASKS") // max(1, _int(env, "SLURM_NNODES"))


def slurm_settings(env: Mapping[str, str]) -> ProcessSettings:
    """This task's settings under SLURM (see the module docstring for the rules)."""
    num_processes, process_id = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST: not set (is this process started by srun?)")
    port = env.get("SDEDIT_COORDINATOR_PORT") or str(
        20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    )
    explicit = env.get("SDEDIT_LOCAL_DEVICE_IDS")
    if explicit:
        local = [int(d) for d in explicit.split(",")]
    elif tasks_per_node(env) == 1:
        local = None
    else:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        local = [0] if len(visible) == 1 else [_int(env, "SLURM_LOCALID")]
    return ProcessSettings(f"{first_host(nodelist)}:{port}", num_processes, process_id, local)


def process_settings(
    env: Mapping[str, str],
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> ProcessSettings:
    """Explicit flags win; else SLURM's variables; else jax's own detection (TPU pods)."""
    if coordinator_address or num_processes is not None or process_id is not None:
        explicit = env.get("SDEDIT_LOCAL_DEVICE_IDS")
        local = [int(d) for d in explicit.split(",")] if explicit else None
        return ProcessSettings(coordinator_address, num_processes, process_id, local)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return slurm_settings(env)
    return ProcessSettings(None, None, None, None)


if __name__ == "__main__":
    print(json.dumps(dataclasses.asdict(process_settings(os.environ))), file=sys.stdout)
