"""Config blocks (dicts, ``ml_collections.ConfigDict``) as frozen dataclasses.

One helper instead of a hand-written validator per block: a key the dataclass does not
declare is a one-line error naming the block, the key and its value (a typo never falls
back to a default); lists become tuples where the field is a tuple, so the result stays
hashable (a static argument of compiled programs). Value checks stay in each dataclass's
``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _tuple_fields(cls: type) -> set[str]:
    """Fields annotated as a tuple (alone or in a union such as ``tuple[int, int] | None``)."""
    return {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}


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
        name = f"{where}.{key}" if where else key
        raise error(f"{name}: unknown field, got {values[key]!r} (known: {', '.join(known)})")
    for name in _tuple_fields(cls) & set(values):
        if isinstance(values[name], list):
            values[name] = tuple(values[name])
    return cls(**values)
