#!/usr/bin/env bash
# Sets up sdedit_jax on one Cloud TPU VM worker (run from the repository root).
#
# TPU runtime images run Ubuntu 22.04 with Python 3.10, and the pinned jax
# needs Python >= 3.11: a standalone CPython 3.12 is installed with uv when the
# system Python is older. Then the project's pinned requirements, and jax[tpu]
# at the same pinned version (libtpu comes from PyPI). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh
  uv python install 3.12
  PY=$(uv python find 3.12)
fi
PYTHON="$PY" bash launch/setup.sh
JAX_PIN=$(grep -E '^jax[<>=]' requirements.txt | cut -d' ' -f1)  # e.g. jax>=0.10,<0.11
.venv/bin/pip install -q "jax[tpu]${JAX_PIN#jax}"
.venv/bin/python -c 'import sys, jax; print(sys.version.split()[0], jax.__version__, jax.devices()[:1])'
