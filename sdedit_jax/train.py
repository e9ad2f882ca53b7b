"""Trains a score model by denoising score matching, data-parallel over all devices.

Usage:

    python -m sdedit_jax.train --config configs/train_emoji.py --workdir runs/emoji_default \
        [--config.training.num_steps=...]

Re-running the same command resumes from the newest checkpoint in ``workdir``.

The loop itself is :mod:`sdedit_jax.training.loop`.
"""

from __future__ import annotations

from sdedit_jax.util import quiet

quiet.import_tensorflow()  # before anything else imports it

from absl import app, flags  # noqa: E402

from sdedit_jax.training.loop import train  # noqa: E402
from sdedit_jax.util import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_file(
    "config", None, "training config file, path[:variant]", prefix="train", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and final weights.")
flags.DEFINE_bool("print_config", False, "print the resolved config and exit")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    quiet.quiet_logs()
    if FLAGS.print_config:
        cli.print_config(FLAGS.config)
        return
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.flags_parser(__doc__, prefix="train", config_flag="config"))
