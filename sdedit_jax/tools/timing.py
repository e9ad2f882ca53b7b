"""Shared by the benchmarks: a timer, the CPU's name, matmul peak, XLA:CPU option sets."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def timed(fn) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul on device 0: the machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


# XLA:CPU compile options (DebugOptions), compared side by side in one process. In jax
# 0.10.2 XLA:CPU already hands convolutions, matmuls and their elementwise neighbours to
# YNNPACK ("__ynn_fusion" in the compiled HLO). Checked there and left out: the XNNPACK
# flags (xla_cpu_use_xnnpack, xla_cpu_experimental_xnn_fusion_type) compile to the same
# program, xla_cpu_use_onednn alone changes nothing, and oneDNN convolution fusions
# (xla_cpu_experimental_onednn_fusion_type=..._CONVOLUTION) die with SIGILL on AMD EPYC.
XLA_CPU_OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "no_ynnpack": {"xla_cpu_experimental_ynn_fusion_type": ""},  # Eigen everywhere
    "onednn_dot": {
        "xla_cpu_use_onednn": True,  # oneDNN matmuls, YNNPACK convolutions
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    },
}


def cpu_model_name() -> str:
    """``lscpu``'s model name (where figures came from), or the platform's processor string."""
    import platform
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [
        line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
    ]
    return names[0] if names else "unknown"
