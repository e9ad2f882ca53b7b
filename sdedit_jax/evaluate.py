"""Command line of the realism-versus-faithfulness evaluation (see :mod:`sdedit_jax.evaluation`).

    python -m sdedit_jax.evaluate --config configs/eval_emoji.py --workdir runs/eval_emoji
    python -m sdedit_jax.evaluate --config configs/eval_tiny.py --config.model_dir=/m --workdir /w

An emoji folder the config reads (``<folder>/emoji<size>/{train,test}``, by default
in ``$XDG_CACHE_HOME/sdedit_jax``) is rendered on first use (about 3 s).
``--print_config`` prints the resolved config. Exit status: 0 done; 2 a
configuration error (one line naming the field, the value and what is allowed,
e.g. an empty reference folder); 1 any other error.
"""

from __future__ import annotations

import os
import re
import sys

from sdedit_jax.util import quiet

tf = quiet.import_tensorflow()  # before anything else imports it

from absl import app, flags  # noqa: E402

from sdedit_jax.data import guide_inputs  # noqa: E402
from sdedit_jax.evaluation import run_evaluation  # noqa: E402
from sdedit_jax.util import cli  # noqa: E402
from sdedit_jax.util.config import resolve_config_path  # noqa: E402

_DEFAULT_CONFIG = resolve_config_path("configs/eval_emoji.py")
# Guide-input fields of earlier versions, in both guide-input blocks.
_MOVED = {**guide_inputs.moved_fields("input"), **guide_inputs.moved_fields("reference")}
_EMOJI_SPLIT = re.compile(r"emoji(\d+)$")


def _define_flags() -> tuple[flags.FlagHolder, flags.FlagHolder, flags.FlagHolder]:
    """The command line's flags, defined only when this module is the program.

    Importing the module (tests, notebooks, other tools such as
    ``sdedit_jax.main`` with its own ``--config``) must not claim flag names.
    """
    config = cli.define_config_file(
        "config",
        _DEFAULT_CONFIG,
        "evaluation config file, path[:variant]",
        prefix="evaluate",
        moved=_MOVED,
    )
    workdir = flags.DEFINE_string("workdir", "runs/eval_emoji", "output folder")
    print_config = flags.DEFINE_bool(
        "print_config", False, "print the resolved config (after every --config.<field>) and exit"
    )
    return config, workdir, print_config


def emoji_folders(config) -> list[tuple[str, int]]:
    """``(folder, size)`` of each missing ``emoji<size>/{train,test}`` folder the config reads."""
    paths = [config.input.path, *config.reference.paths]
    wanted = []
    for path in paths:
        parent, split = os.path.split(os.path.normpath(path))
        match = _EMOJI_SPLIT.match(os.path.basename(parent))
        if match and split in ("train", "test") and not os.path.exists(path):
            wanted.append((parent, int(match.group(1))))
    return sorted(set(wanted))


def build_emoji(config) -> None:
    """Renders each emoji folder the config reads and lacks (one line each on stdout)."""
    from sdedit_jax.data import emoji

    for folder, size in emoji_folders(config):
        print(f"evaluate: building {folder} (first use; about 3 s)", flush=True)
        emoji.build_emoji_folder(folder, size=size)


def main(argv: list[str], config_flag, workdir_flag, print_flag) -> None:
    if len(argv) > 1:
        cli.end(cli.EXIT_CONFIG, f"evaluate: unexpected arguments: {argv[1:]}", sys.stderr)
    quiet.quiet_logs()
    if print_flag.value:
        cli.print_config(config_flag.value)
        cli.end(0)
    if not workdir_flag.value.strip():
        cli.end(cli.EXIT_CONFIG, "evaluate: --workdir: got ''; expected a folder", sys.stderr)
    tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to jax
    try:
        build_emoji(config_flag.value)
        run_evaluation(config_flag.value, workdir_flag.value)
    except ValueError as e:
        cli.end(cli.EXIT_CONFIG, f"evaluate: {cli.one_line(e)}", sys.stderr)
    except OSError as e:
        cli.end(1, f"evaluate: error: {cli.one_line(e)}", sys.stderr)
    cli.end(0)


if __name__ == "__main__":
    _flags = _define_flags()
    parser = cli.flags_parser(
        __doc__,
        prefix="evaluate",
        config_flag="config",
        config_default=_DEFAULT_CONFIG,
        moved=_MOVED,
    )
    app.run(
        lambda argv: main(argv, *_flags),
        argv=cli.resolve_config_argv(sys.argv),
        flags_parser=parser,
    )
