#!/usr/bin/env bash
# Stable Diffusion 1.5 edits on one GPU, bf16 at 512 px: images/s and MFU per batch size.
#
#   SDEDIT_WITH_TORCH=1 bash launch/setup.sh && .venv/bin/pip install -U "jax[cuda12]"
#   bash launch/gpu_bench_sd.sh            # BATCHES=1,4,8,16 STEPS=20 SD_CACHE=/tmp/sd15_random
#
# No downloads: the first run saves random weights of the published SD 1.5 architecture
# into $SD_CACHE with diffusers (torch on CPU, about 2 minutes), later runs reuse them.
# Prints one JSON line per batch size: seconds per batch (median of 3 after a warm-up),
# images/s, TFLOP/s from XLA's cost analysis and MFU against the device's dense bf16 peak.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export XLA_FLAGS="--xla_gpu_deterministic_ops=true ${XLA_FLAGS:-}"
"$PY" -m sdedit_jax.tools.bench_sd --what=gpu --cache="${SD_CACHE:-/tmp/sd15_random}" \
  --batches="${BATCHES:-1,4,8,16}" --steps="${STEPS:-20}" --repeats=3
