"""Weight files: a flax msgpack of a model's state, in bfloat16 or float32.

bfloat16 halves the size and is enough for sampling; each writer returns the file's
sha256 so a model folder pins the exact bytes it was published with.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from sdedit_jax.util import files


def _to_bytes(state: nnx.State, dtype: jnp.dtype) -> bytes:
    pure = nnx.to_pure_dict(state)
    cast = jax.tree.map(
        lambda a: np.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else np.asarray(a),
        pure,
    )
    return serialization.msgpack_serialize(cast)


def _write(path: str, data: bytes) -> str:
    files.publish_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def save_params_bf16(path: str, state: nnx.State) -> str:
    """Writes ``state`` with float leaves in bfloat16; returns the file's sha256."""
    return _write(path, _to_bytes(state, jnp.bfloat16))


def save_params_fp32(path: str, state: nnx.State) -> str:
    """Writes ``state`` with float leaves in float32; returns the file's sha256."""
    return _write(path, _to_bytes(state, jnp.float32))


def load_params(path: str, abstract_state: nnx.State, sha256: str | None = None) -> nnx.State:
    """Reads a weight file into a copy of ``abstract_state``.

    Leaves are cast to the dtypes of ``abstract_state`` (bf16 files load as
    float32 models). Shapes and the set of variables must match exactly.

    Args:
        path: file written by :func:`save_params_bf16` / :func:`save_params_fp32`.
        abstract_state: state of a freshly built model (or its ``nnx.eval_shape``).
        sha256: if given, the file must have this checksum.
    """
    data = files.read_bytes(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} != expected {sha256}")
    try:
        loaded = serialization.msgpack_restore(data)
    except Exception as err:  # msgpack raises several types for corrupt input
        raise ValueError(f"{path}: not a weight file (msgpack: {type(err).__name__})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a weight file (a {type(loaded).__name__}, not a dict)")
    reference = nnx.to_pure_dict(abstract_state)
    ref_paths = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
    got_paths = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    if ref_paths.keys() != got_paths.keys():
        missing = sorted(map(jax.tree_util.keystr, ref_paths.keys() - got_paths.keys()))
        extra = sorted(map(jax.tree_util.keystr, got_paths.keys() - ref_paths.keys()))
        raise ValueError(
            f"{path}: variables differ from the model: missing {missing}, extra {extra}"
        )
    for key, ref in ref_paths.items():
        if tuple(got_paths[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{path}: {jax.tree_util.keystr(key)} has shape {got_paths[key].shape}, "
                f"model expects {ref.shape}"
            )
    cast = jax.tree.map(lambda ref, got: jnp.asarray(got, ref.dtype), reference, loaded)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, cast)
    return state
