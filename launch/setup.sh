#!/usr/bin/env bash
# Installs everything sdedit_jax needs into ./.venv on a fresh Debian/Ubuntu machine (CPU).
# Accelerators: after this, `pip install -U "jax[cuda12]"` (GPU) or "jax[tpu]" (TPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
need_apt=()
dpkg -s fonts-noto-color-emoji >/dev/null 2>&1 || need_apt+=(fonts-noto-color-emoji)
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The studio's browser test (tests/test_studio_browser.py) drives Debian's chromium:
# SDEDIT_WITH_BROWSER=1 (CI) installs it; where apt cannot, the test skips, naming why.
if [ "${SDEDIT_WITH_BROWSER:-0}" = 1 ] && ! command -v chromedriver >/dev/null; then
  { $SUDO apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver \
      >/dev/null; } \
    || echo "setup: chromium not installed (no apt): the studio's browser test will skip" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps -e .
# Optional PyTorch baseline (benchmarks and its parity tests): SDEDIT_WITH_TORCH=1.
if [ "${SDEDIT_WITH_TORCH:-0}" = 1 ]; then
  .venv/bin/pip install -q -r requirements-bench.txt
fi
echo "sdedit_jax installed in $(pwd)/.venv"
