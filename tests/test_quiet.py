"""Quiet startup: importing TensorFlow through sdedit_jax.util.quiet prints nothing on stderr."""

import subprocess
import sys

import pytest


def test_tensorflow_import_leaves_stderr_empty_and_errors_still_show():
    code = (
        "from sdedit_jax.util import quiet; tf = quiet.import_tensorflow(); "
        "print(tf.constant(2).numpy()); import sys; print('after', file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "2"
    assert result.stderr.strip() == "after"  # no oneDNN / absl lines, and fd 2 restored


@pytest.mark.parametrize(
    "module",
    ["sdedit_jax.train", "sdedit_jax.tools.bench_sampler", "sdedit_jax.tools.bench_few_step"],
)
def test_command_lines_start_without_tensorflow_notices(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--helpshort"], capture_output=True, text=True
    )
    assert "flags" in result.stdout.lower()  # the usage (train: its own help, exit 0)
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr
