"""Tools around the library, not part of it: benchmarks, the PyTorch baseline, the
Gaussian closed-form reference, and the scripts that regenerate docs and model cards.

Each runs as ``python -m sdedit_jax.tools.<name>``; nothing in ``sdedit_jax`` imports them.
"""
