"""Command line of the realism-versus-faithfulness evaluation (see :mod:`sdedit_jax.evaluation`).

python -m sdedit_jax.evaluate --config configs/eval_emoji.py --workdir runs/eval_emoji
python -m sdedit_jax.evaluate --config configs/eval_tiny.py --config.model_dir=/m --workdir /w
"""

from __future__ import annotations

from sdedit_jax import quiet

tf = quiet.import_tensorflow()  # before anything else imports it

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sdedit_jax.evaluation import run_evaluation  # noqa: E402


def _define_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """The command line's flags, defined only when this module is the program.

    Importing the module (tests, notebooks, other tools such as
    ``sdedit_jax.main`` with its own ``--config``) must not claim flag names.
    """
    config = config_flags.DEFINE_config_file(
        "config", "configs/eval_emoji.py", "evaluation config file"
    )
    workdir = flags.DEFINE_string("workdir", "runs/eval_emoji", "output folder")
    return config, workdir


def main(argv: list[str], config_flag: flags.FlagHolder, workdir_flag: flags.FlagHolder) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet.quiet_logs()
    tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to jax
    run_evaluation(config_flag.value, workdir_flag.value)


if __name__ == "__main__":
    _config_flag, _workdir_flag = _define_flags()
    app.run(lambda argv: main(argv, _config_flag, _workdir_flag))
