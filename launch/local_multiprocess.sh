#!/usr/bin/env bash
# Runs a job as N processes on this machine (CPU), exercising the multi-host path:
#
#   bash launch/local_multiprocess.sh 2 configs/default.py runs/mp [--config.x=...]
#
# Each process is one "host" with DEVICES_PER_PROCESS simulated CPU devices; they
# meet through jax.distributed on localhost and split the guides by process index.
set -euo pipefail
N=${1:?number of processes}
CONFIG=${2:?config file}
WORKDIR=${3:?workdir}
shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PY=${PY:-.venv/bin/python}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PY" -m sdedit_jax.main --distributed \
    --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" \
    --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
