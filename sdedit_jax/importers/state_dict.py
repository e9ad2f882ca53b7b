"""Checking a foreign state dict against the tensors a network expects, and filling its state.

Importers rename a checkpoint's keys to the target's names first; this module
then compares the whole dict at once, so a bad checkpoint is reported with
every missing, unexpected and mis-shaped tensor in one error, and never turns
into a partially loaded model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Shape = tuple[int, ...]


class StateDictError(ValueError):
    """A state dict does not match the network it is loaded into."""


def _shape(shape: Any) -> str:
    return "(" + ",".join(str(int(n)) for n in shape) + ")"


def check_tensors(source: str, found: Mapping[str, Any], expected: Mapping[str, Shape]) -> None:
    """Raises one :class:`StateDictError` naming every key that does not match.

    Args:
        source: the file or folder the tensors came from (for the message).
        found: the checkpoint's tensors (anything with ``.shape``), by key.
        expected: the shape the network needs for each key.
    """
    problems = []
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(
            f"{len(missing)} missing: " + ", ".join(f"{k} {_shape(expected[k])}" for k in missing)
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected: "
            + ", ".join(f"{k} {_shape(np.shape(found[k]))}" for k in unexpected)
        )
    wrong = [k for k in expected if k in found and tuple(np.shape(found[k])) != tuple(expected[k])]
    if wrong:
        problems.append(
            f"{len(wrong)} mis-shaped: "
            + ", ".join(
                f"{k} expected {_shape(expected[k])} found {_shape(np.shape(found[k]))}"
                for k in wrong
            )
        )
    not_float = [
        k for k in expected if k in found and not jnp.issubdtype(_dtype(found[k]), jnp.floating)
    ]
    if not_float:
        problems.append(f"{len(not_float)} not floating point: " + ", ".join(not_float))
    if problems:
        prefix = f"{source}: " if source else ""
        raise StateDictError(f"{prefix}tensors do not match the network: " + "; ".join(problems))


def _dtype(value: Any) -> np.dtype:
    """A tensor's dtype without reading it (lazy tensors carry theirs)."""
    return np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def flat_paths(state: nnx.State) -> list[tuple[Any, ...]]:
    """Paths (tuples of names and list indices) of every leaf of ``state``."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path) for path, _ in leaves]


def fill_state(
    abstract_state: nnx.State,
    value_for: Callable[[tuple[Any, ...], Shape], np.ndarray],
) -> nnx.State:
    """A copy of ``abstract_state``, each leaf from ``value_for(path, shape)`` in the
    leaf's dtype (a bfloat16 abstract state is filled in bfloat16, one leaf at a time)."""
    pure = nnx.to_pure_dict(abstract_state)

    def fill(path, leaf):
        key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        value = np.asarray(value_for(key, tuple(leaf.shape)))
        if value.shape != tuple(leaf.shape):
            raise StateDictError(f"{key}: built shape {value.shape}, expected {leaf.shape}")
        # One host copy in the leaf's dtype, which device_put takes over on CPU.
        return jax.device_put(np.ascontiguousarray(value, np.dtype(leaf.dtype)))

    filled = jax.tree_util.tree_map_with_path(fill, pure)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, filled)
    return state
