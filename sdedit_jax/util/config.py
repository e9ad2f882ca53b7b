"""Config files (``path.py[:arg]``, found from any folder), their variants, and blocks as
frozen dataclasses.

Configs in ``configs/`` import their shared helpers from here (as big_vision's configs
import ``bvcc``): :func:`parse_arg` for big_vision-style variant arguments
(``"quick"`` or ``"quick,steps=50"``: bare words set boolean fields, ``key=value`` a field
of the default's type), :func:`load_sibling` to derive one config from another,
:func:`package_path` and :func:`cache_folder` for paths that work from any folder.

One helper instead of a hand-written validator per block: a key the dataclass does not
declare is a one-line error naming the block, the key and its value (a typo never falls
back to a default); lists become tuples where the field is a tuple, so the result stays
hashable (a static argument of compiled programs). Value checks stay in each dataclass's
``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

import ml_collections

from sdedit_jax.util import files

T = TypeVar("T")


def _tuple_fields(cls: type) -> set[str]:
    """Fields annotated as a tuple (alone or in a union such as ``tuple[int, int] | None``)."""
    return {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}


def unknown_field(name: str, value: Any, known: Sequence[str]) -> str:
    """The one-line error for ``name`` (dotted), a key its block does not declare.

    Names the closest known key (``difflib``), so a typo reads as one.
    """
    *block, key = name.split(".")
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {'.'.join([*block, close[0]])}?" if close else ""
    return f"{name}: unknown field, got {value!r} (known: {', '.join(known) or 'none'}){hint}"


def _is_block(value: Any) -> bool:
    return hasattr(value, "keys") and hasattr(value, "__getitem__")


def moved_field(path: str, moved: Mapping[str, str] | None, prefix: str = "config") -> str | None:
    """The error for ``path``, a key of an earlier version that ``moved`` renames, else None.

    ``moved`` maps dotted paths to their new names (``"input.tfds_name" ->
    "input.tfds.name"``): such a key is refused naming its new place, never dropped.
    """
    if moved and path in moved:
        return f"{prefix}.{path}: moved to {prefix}.{moved[path]}"
    return None


def unknown_path(
    config: Any,
    path: str,
    value: Any,
    prefix: str = "config",
    moved: Mapping[str, str] | None = None,
) -> str | None:
    """The error for setting ``path`` (``"sampler.snr"``) that ``config`` lacks, else None.

    What ``--config.<path>=<value>`` is checked with, before ml_collections sees it;
    a key that ``moved`` renames is refused with its new name (:func:`moved_field`).
    """
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
        name = ".".join([prefix, *parts[: depth + 1]])
        if not _is_block(node):
            parent = ".".join([prefix, *parts[:depth]])
            return f"{name}: unknown field, got {value!r} ({parent} is a value, not a block)"
        if part not in node.keys():
            return moved_field(path, moved, prefix) or unknown_field(name, value, list(node.keys()))
        node = node[part]
    return None


def first_unknown(
    config: Any, reference: Any, prefix: str = "config", moved: Mapping[str, str] | None = None
) -> str | None:
    """The error for the first key of ``config`` that ``reference`` lacks (nested blocks too).

    Blocks that are empty in ``reference`` (free-form, e.g. ``input.generator_kwargs``)
    are not looked into; a key that ``moved`` renames is refused with its new name.
    """

    def walk(block: Any, known: Any, path: str) -> str | None:
        for key in block.keys():
            dotted = f"{path}.{key}" if path else key
            if key not in known.keys():
                return moved_field(dotted, moved, prefix) or unknown_field(
                    f"{prefix}.{dotted}", block[key], list(known.keys())
                )
            if _is_block(block[key]) and _is_block(known[key]) and len(known[key].keys()):
                error = walk(block[key], known[key], dotted)
                if error:
                    return error
        return None

    return walk(config, reference, "")


def load_module(path: str) -> ModuleType:
    """The config file ``path`` as a module (configs load by path, not as a package)."""
    spec = importlib.util.spec_from_file_location("_sdedit_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frozen(
    cls: type[T], block: Mapping[str, Any] | T, where: str, *, error: type[ValueError] = ValueError
) -> T:
    """``cls(**block)``, refusing keys ``cls`` does not declare; ``block`` may be a ``cls``.

    Args:
        cls: a dataclass (frozen, so that it can be a static argument).
        block: a dict or ``ConfigDict`` of field values; missing fields take defaults.
        where: the block's name in messages, e.g. ``"model"`` or ``"config.input"``
            (``""``: messages start with the key, for callers that add their own prefix).
        error: the exception type raised for an unknown key.
    """
    if isinstance(block, cls):
        return block
    values = dict(block.to_dict() if hasattr(block, "to_dict") else block)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        key = unknown[0]
        raise error(unknown_field(f"{where}.{key}" if where else key, values[key], known))
    for name in _tuple_fields(cls) & set(values):
        if isinstance(values[name], list):
            values[name] = tuple(values[name])
    return cls(**values)


def resolve_config_path(spec: str) -> str:
    """``path/to/config.py[:arg]`` with the path found from any folder.

    The rule: a path that exists (relative to the current folder) is used as
    given; otherwise a relative path such as ``configs/default.py`` is looked
    up in the project's source tree (next to the package) and then in the
    configs installed with the package (``<prefix>/share/sdedit_jax``).
    """
    path, sep, arg = spec.partition(":")
    if os.path.exists(path) or os.path.isabs(path) or not files.is_local(path):
        return spec
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.path.dirname(package), os.path.join(sys.prefix, "share", "sdedit_jax")):
        candidate = os.path.join(root, path)
        if os.path.isfile(candidate):
            return candidate + sep + arg
    return spec


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` the way ``--config`` does."""
    path, _, arg = resolve_config_path(spec).partition(":")
    return load_module(path).get_config(arg or None)


def load_sibling(config_file: str, name: str) -> ModuleType:
    """The config ``<name>.py`` in the folder of ``config_file`` (one config derives another)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))


def package_path(*parts: str) -> str:
    """A path inside the installed package (its assets), whatever the current folder."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *parts)


def cache_folder(name: str) -> str:
    """``$XDG_CACHE_HOME/sdedit_jax/<name>`` (``~/.cache`` when unset): data built on first use.

    Not the current folder, so a command works the same from any folder.
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sdedit_jax", name)


def _cast(where: str, key: str, default, text: str):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where}: variant {key}={text!r} is not a boolean")
        return text.lower() in ("true", "1")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(
            f"{where}: variant {key}={text!r} is not a {type(default).__name__}"
        ) from None


def parse_arg(arg: str | None, where: str, **spec) -> ml_collections.ConfigDict:
    """The variant string ``arg`` as ``spec``'s fields (``spec`` holds the defaults).

    ``where`` (the config's path) starts every error message.
    """
    values = ml_collections.ConfigDict(spec)
    for item in filter(None, (arg or "").split(",")):
        key, eq, text = item.partition("=")
        if key not in spec:
            known = ", ".join(spec) or "none"
            raise ValueError(f"{where}: unknown variant {key!r} (known: {known})")
        if not eq and not isinstance(spec[key], bool):
            raise ValueError(f"{where}: variant {key!r} needs a value ({key}=...)")
        values[key] = _cast(where, key, spec[key], text) if eq else True
    return values


def download_hint(model_dir: str, published: Mapping[str, str]) -> str | None:
    """How to make a missing model folder that a config names (its ``missing_model``).

    ``published`` maps each model folder the config's variants read to the hub folder it
    is converted from; None for a folder that is not one of them.
    """
    for folder, hub in published.items():
        if os.path.normpath(model_dir) == folder:
            local = f"downloads/{hub.split('/')[-1]}"
            return (
                f"download {hub} (huggingface-cli download {hub} --local-dir {local}), then "
                f"python -m sdedit_jax.convert --source {local} --out {folder}"
            )
    return None
