#!/usr/bin/env bash
# Stable Diffusion 1.5 (512 px) and SDXL base (1024 px) edits on one GPU, bf16: images/s
# and MFU per batch size.
#
#   SDEDIT_WITH_TORCH=1 bash launch/setup.sh && .venv/bin/pip install -U "jax[cuda12]"
#   bash launch/gpu_bench_sd.sh            # MODELS=sd15,sdxl BATCHES=1,4,8,16 XL_BATCHES=1,2,4
#                                          # STEPS=20 SD_CACHE=/tmp/sd15_random SDXL_CACHE=/tmp/sdxl_random
#
# No downloads: the first run saves random weights of the published architectures into
# the caches with diffusers (torch on CPU: about 2 minutes for SD 1.5, 7 GB and a few
# minutes for SDXL), later runs reuse them. Prints one JSON line per model and batch
# size: seconds per batch (median of 3 after a warm-up), images/s, TFLOP/s from XLA's
# cost analysis and MFU against the device's dense bf16 peak.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODELS=${MODELS:-sd15,sdxl}
export XLA_FLAGS="--xla_gpu_deterministic_ops=true ${XLA_FLAGS:-}"
if [[ ",$MODELS," == *",sd15,"* ]]; then
  "$PY" -m sdedit_jax.tools.bench_sd --what=gpu --cache="${SD_CACHE:-/tmp/sd15_random}" \
    --batches="${BATCHES:-1,4,8,16}" --steps="${STEPS:-20}" --repeats=3
fi
if [[ ",$MODELS," == *",sdxl,"* ]]; then
  "$PY" -m sdedit_jax.tools.bench_sdxl --what=gpu --cache="${SDXL_CACHE:-/tmp/sdxl_random}" \
    --batches="${XL_BATCHES:-1,2,4}" --steps="${STEPS:-20}" --repeats=3
fi
