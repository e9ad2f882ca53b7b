#!/usr/bin/env bash
# Runs an sdedit_jax job on every worker of a Cloud TPU pod slice.
#
#   REPO=<git url> TPU_NAME=sdedit-v4-32 ZONE=us-central2-b ACCEL=v4-32 \
#   CONFIG=configs/default.py WORKDIR=gs://my-bucket/runs/edit1 bash launch/tpu_pod.sh
#
# Every host runs the same command; `--distributed` makes each call
# jax.distributed.initialize() (TPU metadata supplies the coordinator), read its
# own shard of the guides (by jax.process_index()) and write its own outputs.
# WORKDIR must be storage all workers share (a GCS bucket or a shared disk).
set -euo pipefail
: "${REPO:?set REPO to the git URL of your sdedit_jax clone}" "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:=configs/default.py}" "${WORKDIR:?set WORKDIR}"
ACCEL=${ACCEL:-v4-32}
# The runtime image for the accelerator (Google's table of TPU software versions).
case "$ACCEL" in
  v6e-*) DEFAULT_VERSION=v2-alpha-tpuv6e ;;
  v5p-*) DEFAULT_VERSION=v2-alpha-tpuv5 ;;
  v5litepod-* | v5e-*) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  *) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
esac
VERSION=${VERSION:-$DEFAULT_VERSION}
EXTRA=${EXTRA:-}

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCEL" --version "$VERSION"
fi

# Per-worker setup: code, Python >= 3.11, pinned dependencies, jax[tpu] (idempotent).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d sdedit_jax ] || git clone '$REPO' sdedit_jax
  cd sdedit_jax && git pull --ff-only
  bash launch/tpu_setup.sh
"

# The job itself, on all workers at once. Re-running resumes: finished ids are skipped.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd sdedit_jax && .venv/bin/python -m sdedit_jax.main --distributed \
    --config '$CONFIG' --workdir '$WORKDIR' $EXTRA
"
