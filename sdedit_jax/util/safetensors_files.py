"""safetensors files read and written one tensor at a time, never a whole file in memory.

The safetensors package loads a file whole (``load``) or maps it (``safe_open``: the
pages it touches count as the process's memory until it is closed); an SDXL U-Net is
5 to 10 GB. Here a file's header is parsed on its own, each tensor is read with plain
reads into its own buffer (local files and object stores alike) and a file is written
from a header computed up front, then each tensor's bytes in turn. The format: an
8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets"}}``, optional ``__metadata__``), then the tensors' bytes back to back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sdedit_jax.util import files

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the safetensors package's own bound
_CHUNK = 64 << 20


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file (names the file and the field)."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a file: its place in the file, read on demand (``np.asarray`` reads)."""

    path: str
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    def read(self) -> np.ndarray:
        with files.open_reader(self.path) as f:
            f.seek(self.start)
            return _read_array(f, self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)


def _read_array(f: Any, tensor: Tensor) -> np.ndarray:
    array = np.empty(tensor.shape, tensor.dtype)
    view = array.reshape(-1).view(np.uint8)
    readinto, filled = getattr(f, "readinto", None), 0  # local files read in place
    while filled < view.size:
        window = view[filled : filled + _CHUNK]
        if readinto is not None:
            count = readinto(window)
        else:
            chunk = f.read(window.size)
            count = len(chunk)
            window[:count] = np.frombuffer(chunk, np.uint8)
        if not count:
            raise SafetensorsError(f"{tensor.path}: {tensor.name}: the file ends inside it")
        filled += count
    return array


def _header_bytes(path: str, f: Any, size: int) -> bytes:
    prefix = f.read(8)
    if len(prefix) != 8:
        raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise SafetensorsError(f"{path}: not a safetensors file (header of {length} bytes)")
    return prefix + f.read(length)


def _entry(path: str, name: str, entry: Any, base: int) -> Tensor:
    where = f"{path}: {name}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: expected an object with dtype, shape, data_offsets")
    if entry.get("dtype") not in DTYPES:
        raise SafetensorsError(
            f"{where}: dtype {entry.get('dtype')!r} is not one of {list(DTYPES)}"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(n) is int and n >= 0 for n in offsets)
    ):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    dtype = DTYPES[entry["dtype"]]
    if offsets[1] - offsets[0] != int(np.prod(shape)) * dtype.itemsize:
        raise SafetensorsError(
            f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
            f"shape {shape} of {entry['dtype']} needs {int(np.prod(shape)) * dtype.itemsize}"
        )
    return Tensor(path, name, dtype, tuple(shape), base + offsets[0], base + offsets[1])


def read_header(path: str) -> tuple[dict[str, Tensor], bytes]:
    """``({name: Tensor} in file order, the header's bytes)``; every field checked, and the
    tensors must fill the data section back to back, as the format requires."""
    size = files.size(path)
    with files.open_reader(path) as f:
        header = _header_bytes(path, f, size)
    try:
        entries = json.loads(header[8:])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: not a safetensors file (header: {err})") from None
    if not isinstance(entries, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (the header is not an object)")
    entries.pop("__metadata__", None)
    tensors = sorted(
        (_entry(path, name, entry, len(header)) for name, entry in entries.items()),
        key=lambda t: (t.start, t.end),
    )
    position = len(header)
    for tensor in tensors:
        if tensor.start != position:
            raise SafetensorsError(f"{path}: {tensor.name}: not where the previous tensor ends")
        position = tensor.end
    if position != size:
        raise SafetensorsError(f"{path}: {size - position} bytes past the last tensor")
    return {t.name: t for t in tensors}, header


def lazy_tensors(path: str) -> dict[str, Tensor]:
    """The file's tensors by name, each read when it is used (``np.asarray(tensor)``)."""
    return read_header(path)[0]


def read_all(path: str, sha256: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor in file order, the file read once front to back; with ``sha256``, the
    file's checksum is checked as it is read (a mismatch raises after the last tensor)."""
    tensors, header = read_header(path)
    digest = hashlib.sha256(header)
    with files.open_reader(path) as f:
        f.seek(len(header))
        for name, tensor in tensors.items():
            array = _read_array(f, tensor)
            digest.update(array.reshape(-1).view(np.uint8))
            yield name, array
    if sha256 is not None and digest.hexdigest() != sha256:
        raise SafetensorsError(f"{path}: sha256 {digest.hexdigest()} != expected {sha256}")


def header_for(arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header of a file holding ``arrays`` (anything with ``shape`` and ``dtype``) in
    order, padded with spaces to 8 bytes as the safetensors package writes it."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in arrays.items():
        dtype = np.dtype(array.dtype)
        if dtype not in NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
        nbytes = int(np.prod(array.shape)) * dtype.itemsize
        entries[name] = {
            "dtype": NAMES[dtype],
            "shape": [int(n) for n in array.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


def write(path: str, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str:
    """Publishes ``arrays`` (numpy or jax, each converted when its turn comes) as a
    safetensors file at ``path``; returns the file's sha256."""
    digest, local = hashlib.sha256(), files.is_local(path)

    def chunks() -> Iterator[bytes]:
        for piece in _pieces(arrays, metadata):
            digest.update(piece)
            yield piece if local else bytes(piece)  # object stores take bytes only

    files.publish_chunks(path, chunks())
    return digest.hexdigest()


def _pieces(arrays: Mapping[str, Any], metadata: Mapping[str, str] | None) -> Iterator[Any]:
    yield header_for(arrays, metadata)
    for array in arrays.values():
        host = np.ascontiguousarray(np.asarray(array))
        if host.dtype.byteorder == ">":
            host = host.astype(host.dtype.newbyteorder("<"))
        yield memoryview(host.reshape(-1).view(np.uint8))
