"""The commands' shared front end: their own help, and one line for a bad command line.

absl's ``--help`` exits 1 and ``--helpfull`` lists every flag of every imported
library (TensorFlow, orbax); ml_collections turns a misspelt ``--config.<field>``
into a traceback. :func:`flags_parser` replaces absl's parser (``app.run(...,
flags_parser=...)``): ``--help`` (and ``-h``, ``--helpshort``, ``--helpfull``)
prints the command's docstring, its own flags and every ``--config.`` field with
its default and meaning (the config file's ``FIELD_DOCS``), exit 0; a flag or
config field that does not exist, or a value that does not parse, is one line
(with the closest known name) and exit 2 (:data:`EXIT_CONFIG`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import flags

from sdedit_jax.util import config as config_files
from sdedit_jax.util.config import resolve_config_path

EXIT_CONFIG = 2
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def end(status: int, text: str = "", file=sys.stdout) -> None:
    """Prints ``text`` and ends now (nothing has started that needs shutting down)."""
    if text:
        print(text, file=file)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def shadowing_folder() -> str | None:
    """The folder that hides the package, if ``sdedit_jax`` was imported as a namespace.

    A folder named ``sdedit_jax`` without ``__init__.py`` in the current folder (a
    clone of the repository, run from its parent) comes first on ``sys.path``: the
    commands' modules still load from the installed package, but the package
    itself, its assets and the configs' paths are looked up in that folder.
    """
    package = sys.modules.get("sdedit_jax")
    if package is None or getattr(package, "__file__", None) is not None:
        return None
    return next(iter(package.__path__), None)


def refuse_shadowed_package() -> None:
    """Ends with one line (exit 2) when :func:`shadowing_folder` finds one."""
    folder = shadowing_folder()
    if folder:
        end(
            EXIT_CONFIG,
            f"sdedit_jax: the folder {folder} (not the package: no __init__.py) hides the "
            "installed sdedit_jax; run the command from another folder (e.g. inside the "
            "clone) or rename that folder",
            sys.stderr,
        )


def fields(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every leaf of ``config``; an empty block is a leaf."""
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys") and len(value.keys()):
            yield from fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _shown(value: Any) -> str:
    """A default as it is written on the command line."""
    if hasattr(value, "to_dict"):
        return json.dumps(value.to_dict())
    return repr(value) if not isinstance(value, str) else (value or "''")


def _config_spec(argv: list[str], flag: str, default: str) -> str:
    """The value of ``--<flag>`` on ``argv`` (the last one wins, as absl does)."""
    spec = default
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            spec = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _overrides(argv: list[str], flag: str) -> Iterator[tuple[str, str]]:
    """``(field path, value)`` of each ``--<flag>.<path>=<value>`` on ``argv``."""
    for i, arg in enumerate(argv):
        if arg == "--":
            return
        if arg.startswith(f"--{flag}."):
            name, eq, value = arg[len(flag) + 3 :].partition("=")
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            yield name, value


def load(spec: str) -> tuple[Any, dict[str, str]]:
    """The config of ``path[:variant]`` and its ``FIELD_DOCS`` (one line per dotted field)."""

    path, _, arg = resolve_config_path(spec).partition(":")
    module = config_files.load_module(path)
    return module.get_config(arg or None), dict(getattr(module, "FIELD_DOCS", {}))


def _flag_lines(own: list[flags.Flag]) -> list[str]:
    lines = []
    for flag in sorted(own, key=lambda f: f.name):
        is_config = type(flag).__name__ == "_ConfigFlag"  # its default is a whole config
        default = "" if is_config or flag.default is None else f" (default: {flag.default!r})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    return lines


def help_text(doc: str, own: list[flags.Flag], config_flag: str | None, spec: str) -> str:
    """The command's manual: ``doc``, its flags and (with a config flag) every config field."""
    lines = [doc.strip(), "", "Flags:", *_flag_lines(own)]
    if config_flag and spec:
        try:
            config, docs = load(spec)
        except Exception as e:  # noqa: BLE001 - help still shows the flags
            lines += ["", f"(config fields not shown: {spec}: {' '.join(str(e).split())})"]
        else:
            lines += ["", f"Config fields (--{config_flag}.<field>=<value>; defaults of {spec}):"]
            for name, value in fields(config):
                meaning = f"  {docs[name]}" if name in docs else ""
                lines.append(f"  --{config_flag}.{name}={_shown(value)}{meaning}")
    return "\n".join(lines)


def print_config(config: Any) -> None:
    """The resolved config (after every override) as JSON on stdout."""
    print(config.to_json_best_effort(indent=1, sort_keys=False))


def resolve_config_argv(argv: list[str], flag: str = "config") -> list[str]:
    """``--<flag>`` values resolved with ``resolve_config_path`` (before flags are parsed)."""

    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(f"--{flag}="):
            out[i] = f"--{flag}=" + resolve_config_path(arg[len(flag) + 3 :])
        elif arg == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def _check_config_argv(
    argv: list[str], flag: str, default: str, prefix: str, moved: Mapping[str, str] | None
) -> None:
    """Ends with one line (exit 2) when the config file or a ``--<flag>.<field>`` is bad
    (a field of an earlier version that ``moved`` renames: naming its new place)."""
    spec = _config_spec(argv, flag, default)
    try:
        config, _ = load(spec)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, SyntaxError) as e:
        end(EXIT_CONFIG, f"{prefix}: --{flag}={spec}: {one_line(e)}", sys.stderr)
    for path, value in _overrides(argv, flag):
        error = config_files.unknown_path(config, path, value, prefix=f"--{flag}", moved=moved)
        if error:
            end(EXIT_CONFIG, f"{prefix}: {spec}: {error}", sys.stderr)


def define_config_file(
    name: str,
    default: str | None,
    help_: str,
    *,
    prefix: str,
    moved: Mapping[str, str] | None = None,
    **kwargs,
) -> flags.FlagHolder:
    """``config_flags.DEFINE_config_file``, with the command line's overrides checked first.

    ml_collections applies the ``--<name>.<field>`` of ``sys.argv`` while it defines
    the flag, and a misspelt field is a traceback there; here it is one line.
    ``moved``: fields of earlier versions -> their new dotted names (refused by name).
    """
    from ml_collections import config_flags

    refuse_shadowed_package()
    argv = sys.argv[1:]
    if _config_spec(argv, name, default or "") and any(
        arg.startswith(f"--{name}.") for arg in argv
    ):
        _check_config_argv(argv, name, default or "", prefix, moved)
    return config_flags.DEFINE_config_file(name, default, help_, **kwargs)


def flags_parser(
    doc: str,
    *,
    prefix: str,
    config_flag: str | None = None,
    config_default: str = "",
    moved: Mapping[str, str] | None = None,
) -> Callable[[list[str]], list[str]]:
    """A parser for ``app.run``: own help (exit 0) and one-line flag errors (exit 2).

    Args:
        doc: the command's docstring (the head of its help).
        prefix: starts each error line, e.g. ``"sdedit_jax"``.
        config_flag: the name of the command's config-file flag, if any.
        config_default: its default ``path[:variant]``.
        moved: config fields of earlier versions -> their new dotted names.
    """

    def parse(argv: list[str]) -> list[str]:
        refuse_shadowed_package()
        args = argv[1:]
        if any(arg in HELP_FLAGS for arg in args[: args.index("--") if "--" in args else None]):
            own = flags.FLAGS.get_key_flags_for_module(sys.argv[0])
            if config_flag and config_flag not in {f.name for f in own}:
                own.append(flags.FLAGS[config_flag])  # defined in define_config_file
            spec = _config_spec(args, config_flag, config_default) if config_flag else ""
            end(0, help_text(doc, own, config_flag, spec))
        if config_flag and _config_spec(args, config_flag, config_default):
            _check_config_argv(args, config_flag, config_default, prefix, moved)
        try:
            return flags.FLAGS(argv)
        except (flags.Error, ValueError, TypeError, KeyError, AttributeError) as e:
            end(EXIT_CONFIG, f"{prefix}: {one_line(e)} (see --help)", sys.stderr)

    return parse


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
