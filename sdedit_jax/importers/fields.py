"""Type and range checks of the fields a model file declares, before anything is built from them.

Why: a config value of the wrong type (``"block_out_channels": "abc"``) or a zero
divisor (``"norm_num_groups": 0``) would otherwise surface deep inside a
network or an SDE as a ``TypeError`` or ``ZeroDivisionError`` that names
neither the file nor the field. Every check here raises one ``ValueError``
``"<where>.<field>: got <value>; expected <rule>"`` (callers add the file's path).

Rules: the types are the config dataclass's own annotations (``int``, ``float``,
``bool``, ``str``, ``tuple[int, ...]``, ``X | None``, ...); every int of a network
config is a count or size and must be >= 1 (except those in ``may_be_zero``);
every float must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...'"


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _rule(hint: Any, positive: bool) -> tuple[Any, str]:
    """``(predicate, description)`` for a type annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rules = [_rule(a, positive) for a in args if a is not type(None)]
        ok = any(a is type(None) for a in args)
        return (
            lambda v: (ok and v is None) or any(r[0](v) for r in rules),
            " or ".join([r[1] for r in rules] + (["null"] if ok else [])),
        )
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item, text = _rule(args[0], positive)
            return (
                lambda v: isinstance(v, (list, tuple)) and all(map(item, v)),
                f"a list of {text}s",
            )
        items = [_rule(a, positive) for a in args]
        return (
            lambda v: (
                isinstance(v, (list, tuple))
                and len(v) == len(items)
                and all(r[0](x) for r, x in zip(items, v, strict=True))
            ),
            f"a list of {len(items)} ({', '.join(r[1] for r in items)})",
        )
    if hint is bool:
        return (lambda v: isinstance(v, bool)), "true or false"
    if hint is int:
        if positive:
            return (lambda v: _is_int(v) and v >= 1), "an int >= 1"
        return (lambda v: _is_int(v) and v >= 0), "an int >= 0"
    if hint is float:
        return _is_float, "a finite number"
    if hint is str:
        return (lambda v: isinstance(v, str)), "a string"
    return (lambda v: True), "any value"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_dataclass_fields(
    cls: type, values: Mapping[str, Any], where: str, *, may_be_zero: Iterable[str] = ()
) -> None:
    """Checks each field of ``values`` that ``cls`` declares against its annotation.

    Unknown fields are left to the config's own constructor (which names them).
    """
    hints, zero_ok = _hints(cls), set(may_be_zero)
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        ok, allowed = _rule(hints[field.name], positive=field.name not in zero_ok)
        if not ok(value):
            raise ValueError(f"{_name(where, field.name)}: got {_short(value)}; expected {allowed}")


def check_values(values: Mapping[str, Any], rules: Mapping[str, tuple[Any, str]], where: str):
    """Checks ``values[k]`` with ``rules[k] = (predicate, description)`` for each k present."""
    for key, (ok, allowed) in rules.items():
        if key in values and not ok(values[key]):
            raise ValueError(f"{_name(where, key)}: got {_short(values[key])}; expected {allowed}")


# Reusable rules for configs whose fields are not a dataclass of this project.
POSITIVE_INT = ((lambda v: _is_int(v) and v >= 1), "an int >= 1")
NON_NEGATIVE_INT = ((lambda v: _is_int(v) and v >= 0), "an int >= 0")
POSITIVE_INT_OR_NULL = ((lambda v: v is None or (_is_int(v) and v >= 1)), "an int >= 1 or null")
FINITE = (_is_float, "a finite number")
POSITIVE = ((lambda v: _is_float(v) and v > 0), "a finite number > 0")
PROBABILITY = ((lambda v: _is_float(v) and 0 < v < 1), "a number in (0, 1)")
UNIT_INTERVAL = ((lambda v: _is_float(v) and 0 <= v < 1), "a number in [0, 1)")
BOOL = ((lambda v: isinstance(v, bool)), "true or false")
STRING = ((lambda v: isinstance(v, str)), "a string")
STRING_OR_NULL = ((lambda v: v is None or isinstance(v, str)), "a string or null")
STRINGS = (
    (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v)),
    "a non-empty list of strings",
)
POSITIVE_INTS = (
    (
        lambda v: (
            isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(x) and x >= 1 for x in v)
        )
    ),
    "a non-empty list of ints >= 1",
)


def check_sde_config(config: Mapping[str, Any], where: str):
    """The SDE of ``{"name": ..., **fields}``, its field types and ranges checked first.

    Beyond the types: VE's ``0 < sigma_min < sigma_max``, VP's ``0 <= beta_min <
    beta_max``, and ``0 <= eps < 1`` (the discrete schedule checks its own betas).
    """
    from sdedit_jax import sde as sdes

    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: got {_short(config)}; expected an object with a 'name'")
    fields = {k: v for k, v in config.items() if k != "name"}
    name = config.get("name")
    if name not in sdes.SDES:
        raise ValueError(f"{where}.name: got {_short(name)}; expected one of {sorted(sdes.SDES)}")
    cls = sdes.SDES[name]
    check_dataclass_fields(cls, fields, where)
    try:
        built = sdes.sde_from_config(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    ranges = {
        "sigma_min": (0 < getattr(built, "sigma_min", 1) < getattr(built, "sigma_max", 2)),
        "beta_min": (0 <= getattr(built, "beta_min", 0) < getattr(built, "beta_max", 1)),
        "eps": 0 <= built.eps < 1,
    }
    rules = {
        "sigma_min": "0 < sigma_min < sigma_max",
        "beta_min": "0 <= beta_min < beta_max",
        "eps": "0 <= eps < 1",
    }
    for key, ok in ranges.items():
        if not ok:
            got = _short(getattr(built, key))
            raise ValueError(f"{where}.{key}: got {got}; expected {rules[key]}")
    return built
