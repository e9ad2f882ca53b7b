"""Reads PyTorch checkpoints (``.pth``/``.pt``) into numpy arrays without torch.

Pretrained feature networks for the metrics ship as torch state dicts. Importing
torch only to read them would add a ~1 GB dependency, and ``torch.load`` runs
arbitrary pickled code unless told otherwise. This reader parses the pickle with
an allow-list: only the handful of callables a plain tensor state dict needs
(``OrderedDict``, the tensor-rebuild helpers and the typed storage classes) are
resolved; any other global makes loading fail with a ``CheckpointError``.

Both serialisation formats torch has written since 0.4 are understood:

* zip (torch >= 1.6): ``<root>/data.pkl`` plus one raw file per storage under
  ``<root>/data/<key>``.
* legacy: consecutive pickles (magic number, protocol version, system info, the
  object, the storage keys) followed by each storage as an int64 element count
  and its raw little-endian bytes.

Tensors keep torch's strides on disk (a checkpoint converted from TensorFlow can
store conv kernels channel-last), so every array is rebuilt from its storage with
its own offset and strides and then copied to a C-contiguous array.

Bounded memory: what the pickle and the zip headers declare is compared with the
file's size before anything is read or built. Torch stores storages
uncompressed, so all storages together need at most the file's bytes (a
compressed entry that would inflate beyond that, or a false size field, is
refused); each tensor holds at most the elements of its storage (no stride-0
blow-up), and all distinct tensors together at most the file's bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from sdedit_jax.util import files

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class CheckpointError(ValueError):
    """The file is not a torch checkpoint this reader can load safely."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A (view of a) storage: ``numel`` elements from ``offset`` of storage ``key``."""

    key: str
    dtype: np.dtype
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    """A tensor to build once storage bytes are known (legacy files store them last)."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorSpec:
    # Serves _rebuild_tensor (4 args) and _rebuild_tensor_v2 (+ requires_grad,
    # backward_hooks, metadata): autograd state is irrelevant for inference weights.
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"tensor rebuilt from a non-storage object {type(storage)!r}")
    return _TensorSpec(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


def _fresh_callable(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any]]:
    return lambda: lambda *args, **kwargs: fn(*args, **kwargs)


# Each lookup yields a new object: a pickle's BUILD opcode can set attributes on
# whatever find_class returned, and must not reach shared state (the real
# OrderedDict class, or storage types used by later loads).
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): _fresh_callable(collections.OrderedDict),
    ("torch._utils", "_rebuild_tensor"): _fresh_callable(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _fresh_callable(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _fresh_callable(_rebuild_parameter),
    **{
        ("torch", name): functools.partial(_StorageType, name, dtype)
        for name, dtype in _STORAGE_DTYPES.items()
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage ids."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self.refs: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            make = _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._source}: refusing to load global '{module}.{name}'; only plain "
                "tensor state dicts are supported"
            ) from None
        return make()

    def persistent_load(self, pid: Any) -> _StorageRef:
        # zip: ('storage', type, key, location, numel)
        # legacy: ('storage', type, root_key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        # Re-derive the dtype from the name: the pickle itself may have edited the object.
        dtype = _STORAGE_DTYPES.get(getattr(storage_type, "name", None))
        if not isinstance(storage_type, _StorageType) or dtype is None:
            raise CheckpointError(f"{self._source}: storage {key} has no torch storage type")
        self.refs.setdefault(key, _StorageRef(key, dtype, 0, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return self.refs[key]
        _view_key, view_offset, view_size = view
        return _StorageRef(key, dtype, int(view_offset), int(view_size))


def _unpickle(file: BinaryIO, source: str) -> tuple[Any, dict[str, _StorageRef]]:
    """Unpickles one object; also returns every storage it references, by key."""
    unpickler = _RestrictedUnpickler(file, source)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: corrupt pickle ({err})") from err
    return obj, unpickler.refs


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _materialise(spec: _TensorSpec, storages: dict[str, np.ndarray], source: str) -> np.ndarray:
    """Builds a C-contiguous array from its storage, offset and strides (in elements)."""
    try:
        flat = storages[spec.storage.key]
    except KeyError:
        raise CheckpointError(f"{source}: storage {spec.storage.key} is missing") from None
    view = flat[spec.storage.offset : spec.storage.offset + spec.storage.numel]
    if len(spec.shape) != len(spec.strides):
        raise CheckpointError(f"{source}: tensor shape {spec.shape} vs strides {spec.strides}")
    if any(n == 0 for n in spec.shape):
        return np.zeros(spec.shape, dtype=flat.dtype)
    if spec.offset < 0 or any(s < 0 for s in spec.strides):
        raise CheckpointError(
            f"{source}: negative tensor offset/stride in storage {spec.storage.key}"
        )
    last = spec.offset + sum((n - 1) * s for n, s in zip(spec.shape, spec.strides, strict=True))
    if last >= view.size:
        raise CheckpointError(
            f"{source}: tensor of shape {spec.shape} overruns storage {spec.storage.key} "
            f"({view.size} elements)"
        )
    strided = np.lib.stride_tricks.as_strided(
        view[spec.offset :],
        shape=spec.shape,
        strides=tuple(s * flat.itemsize for s in spec.strides),
        writeable=False,
    )
    return np.array(strided, order="C")


def _specs(obj: Any) -> dict[int, _TensorSpec]:
    """Every distinct tensor placeholder in ``obj``, by ``id`` (iterative: no recursion)."""
    found, stack = {}, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, _TensorSpec):
            found[id(item)] = item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def _check_sizes(obj: Any, source: str, budget: int) -> None:
    """Each tensor within its storage's element count, all of them within ``budget`` bytes."""
    total = 0
    for spec in _specs(obj).values():
        if not all(map(_is_index, (*spec.shape, *spec.strides, spec.offset))):
            raise CheckpointError(
                f"{source}: tensor shape {spec.shape}, strides {spec.strides} and offset "
                f"{spec.offset} must be ints >= 0"
            )
        elements = math.prod(spec.shape)
        if elements > spec.storage.numel:
            raise CheckpointError(
                f"{source}: a tensor of shape {spec.shape} (strides {spec.strides}) needs "
                f"{elements} elements, its storage {spec.storage.key} holds {spec.storage.numel}"
            )
        total += elements * spec.storage.dtype.itemsize
    if total > budget:
        raise CheckpointError(
            f"{source}: its tensors need {total} bytes, more than the file's {budget} "
            "(a stride-0 or repeated tensor?)"
        )


def _resolve(
    obj: Any, storages: dict[str, np.ndarray], source: str, budget: int | None = None
) -> Any:
    """Replaces every tensor placeholder inside dicts, lists and tuples by its array.

    A placeholder the pickle shares (one tensor under two names) becomes one array.
    With ``budget`` (the file's size), more tensor bytes than that are refused first.
    """
    if budget is not None:
        _check_sizes(obj, source, budget)
    built: dict[int, np.ndarray] = {}

    def resolve(item: Any) -> Any:
        if isinstance(item, _TensorSpec):
            if id(item) not in built:
                built[id(item)] = _materialise(item, storages, source)
            return built[id(item)]
        if isinstance(item, dict):
            return {k: resolve(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(resolve(v) for v in item)
        return item

    return resolve(obj)


def _storage_bytes(ref: _StorageRef, source: str) -> int:
    if not _is_index(ref.numel):
        raise CheckpointError(f"{source}: storage {ref.key} has {ref.numel!r} elements")
    return ref.numel * ref.dtype.itemsize


def _check_budget(needed: int, budget: int, source: str) -> None:
    if needed > budget:
        raise CheckpointError(
            f"{source}: its storages need {needed} bytes, more than the file's {budget} "
            "(torch stores them uncompressed: a truncated file, a false size, or an entry "
            "that inflates)"
        )


def _read_member(archive: zipfile.ZipFile, name: str, size: int, path: str) -> bytes:
    """Exactly ``size`` bytes of a zip member that declares that size (never more)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: storage file {name} is missing") from None
    if info.file_size != size:
        raise CheckpointError(
            f"{path}: {name} declares {info.file_size} bytes, its storage needs {size}"
        )
    with archive.open(info) as member:
        raw = member.read(size + 1)
    if len(raw) != size:
        raise CheckpointError(f"{path}: {name} holds {len(raw)} bytes, its storage needs {size}")
    return raw


def _load_zip(path: str, file: BinaryIO, budget: int) -> Any:
    with zipfile.ZipFile(file) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the zip, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        for name in pickles + [root + "byteorder"] * (root + "byteorder" in archive.namelist()):
            if archive.getinfo(name).file_size > budget:
                raise CheckpointError(
                    f"{path}: {name} declares {archive.getinfo(name).file_size} bytes, more "
                    f"than the file's {budget}"
                )
        if root + "byteorder" in archive.namelist():
            order = archive.read(root + "byteorder").decode(errors="replace").strip()
            if order != "little":
                raise CheckpointError(f"{path}: byteorder '{order[:20]}' is not supported")
        obj, refs = _unpickle(io.BytesIO(archive.read(pickles[0])), path)
        needed = {key: _storage_bytes(ref, path) for key, ref in refs.items()}
        _check_budget(sum(needed.values()), budget, path)
        storages = {}
        for key, ref in refs.items():
            raw = _read_member(archive, f"{root}data/{key}", needed[key], path)
            storages[key] = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<"))
    return _resolve(obj, storages, path, budget)


def _load_legacy(path: str, f: BinaryIO, budget: int) -> Any:
    magic, _ = _unpickle(f, path)
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
    protocol, _ = _unpickle(f, path)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: legacy protocol {protocol} is not supported")
    sys_info, _ = _unpickle(f, path)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise CheckpointError(f"{path}: only little-endian checkpoints are supported")
    obj, refs = _unpickle(f, path)
    keys, _ = _unpickle(f, path)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{path}: the storage keys are not a list of names")
    _check_budget(sum(_storage_bytes(ref, path) for ref in refs.values()), budget, path)
    storages = {}
    for key in keys:
        if key not in refs:
            raise CheckpointError(f"{path}: storage {key} is stored but never referenced")
        dtype = refs[key].dtype.newbyteorder("<")
        numel = int.from_bytes(f.read(8), "little", signed=True)
        remaining = budget - f.tell()
        if numel != refs[key].numel or not 0 <= numel * dtype.itemsize <= remaining:
            raise CheckpointError(
                f"{path}: storage {key} is truncated or mis-sized (it declares {numel} "
                f"elements, its pickle {refs[key].numel}, and {remaining} bytes remain)"
            )
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: storage {key} is truncated or mis-sized")
        storages[key] = np.frombuffer(raw, dtype=dtype)
    return _resolve(obj, storages, path, budget)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Loads a torch checkpoint; tensors become numpy arrays, containers plain dicts.

    Raises:
        CheckpointError: the file is malformed or references a non-allow-listed global.
    """
    path = os.fspath(path)
    with files.open_file(path, "rb") as f:
        budget = f.seek(0, io.SEEK_END)
        f.seek(0)
        is_zip = zipfile.is_zipfile(f)
        f.seek(0)
        return _load_zip(path, f, budget) if is_zip else _load_legacy(path, f, budget)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a flat ``{name: tensor}`` state dict as ``{name: np.ndarray}``."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.fspath(path)}: top level is {type(obj).__name__}, not a dict")
    for name, value in obj.items():
        if not (isinstance(name, str) and isinstance(value, np.ndarray)):
            raise CheckpointError(
                f"{os.fspath(path)}: entry {name!r} is {type(value).__name__}, not a tensor"
            )
    return obj
