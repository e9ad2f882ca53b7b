"""Weight files: a model's state as a flax msgpack or, for big models, safetensors.

bfloat16 halves the size and is enough for sampling; each writer returns the file's
sha256 so a model folder pins the exact bytes it was published with. msgpack files
are read and written whole (the pixel models, tens of MB); safetensors files one
tensor at a time, straight into their dtype and sharding (latent models, up to
10 GB: :func:`save_state` and :func:`load_state` hold no second copy).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from sdedit_jax.util import files, host_memory
from sdedit_jax.util import safetensors_files as st


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


def leaf_name(path: tuple[Any, ...]) -> str:
    """A state leaf's name in a safetensors file: its path joined with dots."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def named_leaves(state: nnx.State) -> dict[str, Any]:
    """Every leaf of ``state`` by its :func:`leaf_name`."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {leaf_name(path): leaf for path, leaf in leaves}


def save_state(path: str, state: nnx.State) -> str:
    """Writes ``state`` as safetensors in its own dtypes, one leaf at a time; returns the
    file's sha256."""
    return st.write(path, named_leaves(state))


def load_state(
    path: str,
    abstract_state: nnx.State,
    sha256: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> nnx.State:
    """Reads a :func:`save_state` file into a copy of ``abstract_state``, each tensor placed
    with ``sharding`` (default: the default device) as soon as it is read.

    Float leaves keep the file's dtype (a bfloat16 folder stays bfloat16 in memory;
    the networks cast weights to their compute dtype). Names, shapes and the file's
    sha256 must match; every mismatched name is listed in one error.
    """
    host_memory.map_large_blocks()
    expected = {n: tuple(leaf.shape) for n, leaf in named_leaves(abstract_state).items()}
    tensors, _ = st.read_header(path)
    missing, extra = sorted(expected.keys() - tensors), sorted(tensors.keys() - expected)
    shaped = [n for n in expected if n in tensors and tensors[n].shape != expected[n]]
    if missing or extra or shaped:
        wrong = [f"{n} is {tensors[n].shape}, model expects {expected[n]}" for n in shaped]
        raise ValueError(
            f"{path}: variables differ from the model: missing {missing}, extra {extra}"
            + (f", mis-shaped {wrong}" if wrong else "")
        )
    # device_put, not jnp.asarray: on CPU it takes the buffer over instead of copying it.
    placed = {name: jax.device_put(array, sharding) for name, array in st.read_all(path, sha256)}
    state = jax.tree.map(lambda x: x, abstract_state)
    pure = nnx.to_pure_dict(abstract_state)
    filled = jax.tree_util.tree_map_with_path(lambda p, _: placed.pop(leaf_name(p)), pure)
    nnx.replace_by_pure_dict(state, filled)
    return state
