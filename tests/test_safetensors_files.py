"""safetensors files one tensor at a time: the safetensors package is the truth for the
format both ways; malformed files are named; a state round-trips in its dtype, placed."""

import hashlib
import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from sdedit_jax.util import safetensors_files as st
from sdedit_jax.util import weights

ARRAYS = {
    "down.0.kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "half": np.linspace(-2, 2, 5).astype(np.float16),
    "brain": (np.arange(6).reshape(2, 3) / 3).astype(ml_dtypes.bfloat16),
    "empty": np.zeros((0, 3), np.float32),
    "ids": np.arange(4, dtype=np.int64),
    "flags": np.array([True, False]),
}


def test_written_files_are_what_the_safetensors_package_reads(tmp_path):
    path = str(tmp_path / "w.safetensors")
    digest = st.write(path, ARRAYS, metadata={"format": "np"})
    data = (tmp_path / "w.safetensors").read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    loaded = safetensors.numpy.load_file(path)
    assert loaded.keys() == ARRAYS.keys()
    for name, array in ARRAYS.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)
    (length,) = struct.unpack("<Q", data[:8])
    assert (8 + length) % 8 == 0 and json.loads(data[8 : 8 + length])["__metadata__"]


def test_files_the_package_writes_are_read_tensor_by_tensor(tmp_path):
    path = str(tmp_path / "p.safetensors")
    safetensors.numpy.save_file(ARRAYS, path)
    lazy = st.lazy_tensors(path)
    assert lazy.keys() == ARRAYS.keys()
    for name, array in ARRAYS.items():
        assert lazy[name].shape == array.shape and lazy[name].dtype == array.dtype
        np.testing.assert_array_equal(np.asarray(lazy[name]), array)
    sha = hashlib.sha256((tmp_path / "p.safetensors").read_bytes()).hexdigest()
    read = dict(st.read_all(path, sha))
    for name, array in ARRAYS.items():
        np.testing.assert_array_equal(read[name], array)
    with pytest.raises(st.SafetensorsError, match="p.safetensors: sha256 .* != expected 00"):
        list(st.read_all(path, "00"))


def test_torch_bfloat16_files_read_to_the_same_values(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    value = torch.randn(3, 5).to(torch.bfloat16)
    path = str(tmp_path / "t.safetensors")
    safetensors_torch.save_file({"w": value}, path)
    ((name, array),) = st.read_all(path)
    assert name == "w" and array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(array.astype(np.float32), value.float().numpy())


def _header_file(tmp_path, header: dict, data: bytes = b"", length: int | None = None):
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return str(path)


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            None,
            "bytes past the last tensor|w: the file ends",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            1 << 40,
            "not a safetensors file \\(header of",
        ),
        (
            {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "bad.safetensors: w: dtype 'Q9' is not one of",
        ),
        (
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "w: data_offsets \\[0, 8\\] hold 8 bytes, shape \\[3\\] of F32 needs 12",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            None,
            "b: not where the previous tensor ends",
        ),
        (
            {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            None,
            "w: shape \\[-1\\] is not a list of sizes",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 9,
            None,
            "5 bytes past the last tensor",
        ),
    ],
)
def test_a_malformed_file_is_named_with_the_tensor_and_field(
    tmp_path, header, data, length, message
):
    path = _header_file(tmp_path, header, data, length)
    with pytest.raises(st.SafetensorsError, match=message):
        list(st.read_all(path))


def test_a_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff{]x")
    with pytest.raises(st.SafetensorsError, match="bad.safetensors: not a safetensors file"):
        st.read_header(str(path))


def test_object_stores_round_trip():
    path = "ram://safetensors_test/x.safetensors"
    digest = st.write(path, ARRAYS)
    read = dict(st.read_all(path, digest))
    for name, array in ARRAYS.items():
        np.testing.assert_array_equal(read[name], array)
    np.testing.assert_array_equal(np.asarray(st.lazy_tensors(path)["half"]), ARRAYS["half"])


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Linear(3, 4, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])


def _abstract():
    return nnx.state(nnx.eval_shape(lambda: _Net(nnx.Rngs(0))))


def test_a_state_round_trips_in_its_dtypes(tmp_path):
    state = nnx.state(_Net(nnx.Rngs(1)))
    path = str(tmp_path / "s.safetensors")
    sha = weights.save_state(path, state)
    loaded = weights.load_state(path, _abstract(), sha)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded), strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    assert "blocks.1.kernel" in st.lazy_tensors(path)
    half = str(tmp_path / "h.safetensors")
    rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
    loaded = weights.load_state(half, _abstract(), weights.save_state(half, rounded))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded), strict=True):
        assert b.dtype == jnp.bfloat16  # kept as stored: the networks cast at use
        np.testing.assert_array_equal(np.asarray(a).astype(ml_dtypes.bfloat16), b)


def test_a_state_is_placed_with_the_sharding_it_is_read_into(tmp_path):
    state = nnx.state(_Net(nnx.Rngs(1)))
    path = str(tmp_path / "s.safetensors")
    sha = weights.save_state(path, state)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    loaded = weights.load_state(path, _abstract(), sha, replicated)
    for leaf in jax.tree.leaves(loaded):
        assert leaf.sharding == replicated and len(leaf.devices()) == len(jax.devices())


def test_a_file_of_another_model_is_refused_by_every_name(tmp_path):
    state = nnx.state(_Net(nnx.Rngs(1)))
    arrays = weights.named_leaves(state)
    arrays["extra.bias"] = np.zeros(2, np.float32)
    arrays["first.kernel"] = np.zeros((4, 3), np.float32)
    del arrays["blocks.0.bias"]
    path = str(tmp_path / "o.safetensors")
    st.write(path, arrays)
    with pytest.raises(ValueError) as err:
        weights.load_state(path, _abstract())
    text = str(err.value)
    assert "missing ['blocks.0.bias']" in text and "extra ['extra.bias']" in text
    assert "first.kernel is (4, 3), model expects (3, 4)" in text
