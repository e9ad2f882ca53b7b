"""Quiet startup for the command lines: the first lines a user sees are the job's own.

TensorFlow (used here for tf.data only) prints its oneDNN notice through C++
logging while it is being imported, before absl's logging is set up, so no
log level reaches it; :func:`import_tensorflow` runs that import with the
process's stderr pointed at /dev/null (Python errors still show: they are
printed after it is restored). oneDNN itself stays on on purpose:
``TF_ENABLE_ONEDNN_OPTS=0`` would silence it too, but changes the
``stroke_painting`` generator's outputs (measured), so evaluation guides would
change. :func:`quiet_logs` drops JAX's INFO line about the missing TPU backend
and absl's INFO lines (orbax logs every checkpoint step there), unless the user
asks for them with ``--verbosity``.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType


def import_tensorflow() -> ModuleType:
    """``import tensorflow`` without its C++ startup notices on stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tensorflow


def quiet_logs() -> None:
    """Libraries' INFO logs off (JAX's backend probe, orbax); keep warnings and errors."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from absl import flags
    from absl import logging as absl_logging

    if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
        absl_logging.set_verbosity(absl_logging.WARNING)
