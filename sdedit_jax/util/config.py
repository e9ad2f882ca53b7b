"""Config blocks (dicts, ``ml_collections.ConfigDict``) as frozen dataclasses.

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
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

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


def unknown_path(config: Any, path: str, value: Any, prefix: str = "config") -> str | None:
    """The error for setting ``path`` (``"sampler.snr"``) that ``config`` lacks, else None.

    What ``--config.<path>=<value>`` is checked with, before ml_collections sees it.
    """
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
        name = ".".join([prefix, *parts[: depth + 1]])
        if not _is_block(node):
            parent = ".".join([prefix, *parts[:depth]])
            return f"{name}: unknown field, got {value!r} ({parent} is a value, not a block)"
        if part not in node.keys():
            return unknown_field(name, value, list(node.keys()))
        node = node[part]
    return None


def first_unknown(config: Any, reference: Any, prefix: str = "config") -> str | None:
    """The error for the first key of ``config`` that ``reference`` lacks (nested blocks too).

    Blocks that are empty in ``reference`` (free-form, e.g. ``input.generator_kwargs``)
    are not looked into.
    """
    for key in config.keys():
        name = f"{prefix}.{key}"
        if key not in reference.keys():
            return unknown_field(name, config[key], list(reference.keys()))
        value, known = config[key], reference[key]
        if _is_block(value) and _is_block(known) and len(known.keys()):
            error = first_unknown(value, known, name)
            if error:
                return error
    return None


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
