"""The one file layer: every path the project reads or writes goes through here.

Why: a job's workdir, inputs and model folders may live on local disks, shared
file systems or object stores (``gs://``, TensorFlow's in-memory ``ram://``,
any scheme ``tf.io.gfile`` knows). Plain ``open``/``os`` calls silently treat
``gs://b/x`` as a local folder named ``gs:``; routing every access through this
module makes that impossible.

Paths are strings. A path is *local* when it has no ``scheme://`` prefix (or
is ``file://...``); local paths use Python's own ``os``/``open`` (fast, and
``fsync`` works), every other path uses ``tf.io.gfile`` (TensorFlow is only
imported when such a path is used). Errors come out as Python's own types:
``FileNotFoundError``, ``PermissionError``, or :class:`StorageError` (an
``OSError``) for everything else a storage backend reports, always naming the
path.

**Publication rule** (:func:`publish_bytes`): a file is either absent or
complete, never partial.

* Local: write a temporary file in the target's folder, flush, ``fsync``,
  then ``os.replace`` it over the target (atomic on POSIX).
* Object stores (rename is a copy there, not atomic): write the final object
  once, in one upload; the object becomes visible only when the upload has
  completed. Never append to or rewrite an object in place. (TensorFlow's
  in-memory ``ram://`` has an atomic rename and is published like local files.)

Consumers rely on the corollary: a record that *refers* to a file (e.g. a
manifest row naming an output image) is published only after that file's
publication returned, so a record never points to a missing or partial file.

API (paths are ``str``; every function takes local paths and URLs alike):

* paths: :func:`scheme`, :func:`is_local`, :func:`join`, :func:`dirname`,
  :func:`basename`, :func:`abspath`, :func:`relpath`;
* queries: :func:`exists`, :func:`isdir`, :func:`isfile`, :func:`size`,
  :func:`listdir`, :func:`walk`, :func:`glob`;
* reading: :func:`read_bytes`, :func:`read_text`, :func:`read_lines` (streamed),
  :func:`open_file`, :func:`sha256`, :func:`read_json_object` (bounded size and depth);
  local reads open regular files only (a FIFO, a device or a link to one is refused
  with :class:`NotRegularFile` before anything could block or read forever);
* writing: :func:`publish_bytes` / :func:`publish_chunks` (atomic, the only way
  to write anything another process or a resumed run reads), :func:`makedirs`,
  :func:`remove`, :func:`rmtree`, :func:`append_bytes` (small logs only),
  :func:`temp_name` / :func:`is_temp_name` (orphans of killed publications),
  :func:`check_writable` (fail fast on an unusable workdir), :func:`publish_folder`
  (a whole folder at once: filled in a temporary sibling, then renamed into place).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
TEMP_MARKER = ".sdedit-tmp"  # in the names of temporary files of local publication
# In-memory stores with an atomic rename (and whose "wb" appends to an existing
# object instead of replacing it): published like local files, by rename.
_RENAME_STORES = ("ram",)


class StorageError(OSError):
    """A storage backend refused or failed an operation (the message names the path)."""


class NotRegularFile(StorageError):
    """A local path to read is a FIFO, device or socket (reading it could block or never end)."""


# --- paths -------------------------------------------------------------------------------------


def scheme(path: str) -> str:
    """``"gs"``, ``"ram"``, ... for URLs; ``""`` for local paths (``file://`` included)."""
    match = _SCHEME.match(os.fspath(path))
    return "" if match is None or match.group(1).lower() == "file" else match.group(1).lower()


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local file system (no scheme, or ``file://``)."""
    return scheme(path) == ""


def _local(path: str) -> str:
    path = os.fspath(path)
    return path[len("file://") :] if path.lower().startswith("file://") else path


def join(base: str, *parts: str) -> str:
    """Joins path components; URLs always use ``/``.

    Like ``os.path.join`` with an absolute component, a URL component starts
    the path over (a local manifest may name ``gs://`` inputs).
    """
    if "://" not in "".join((base, *parts)):  # fast path: local (joins run once per input)
        return os.path.join(base, *parts)
    for i in range(len(parts) - 1, -1, -1):
        if not is_local(parts[i]):
            return join(parts[i], *parts[i + 1 :])
    if is_local(base):
        return os.path.join(_local(base), *parts)
    return posixpath.join(base, *parts)


def dirname(path: str) -> str:
    """The folder of ``path`` (``gs://b`` stays the bucket root)."""
    if "://" not in path:
        return os.path.dirname(path)
    if is_local(path):
        return os.path.dirname(_local(path))
    prefix = _SCHEME.match(path).group(0)
    rest = path[len(prefix) :].rstrip("/")
    return prefix + posixpath.dirname(rest) if "/" in rest else prefix + rest


def basename(path: str) -> str:
    """The last component of ``path``."""
    return posixpath.basename(path.rstrip("/")) if not is_local(path) else os.path.basename(path)


def abspath(path: str) -> str:
    """Absolute form of a local path; URLs are already absolute and returned unchanged."""
    return os.path.abspath(_local(path)) if is_local(path) else path


def relpath(path: str, start: str) -> str:
    """``path`` relative to the folder ``start`` (POSIX separators for URLs)."""
    if is_local(path):
        return os.path.relpath(_local(path), _local(start))
    prefix = start.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {start}")
    return path[len(prefix) :]


# --- backend plumbing --------------------------------------------------------------------------


def _gfile():
    import tensorflow as tf  # only URLs pay for the import

    return tf.io.gfile


@contextlib.contextmanager
def _translated(path: str) -> Iterator[None]:
    """Re-raises TensorFlow's storage errors as Python OSErrors naming ``path``."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.NotFoundError as e:
        raise FileNotFoundError(f"{path}: not found ({_one_line(e.message)})") from None
    except tf.errors.PermissionDeniedError as e:
        raise PermissionError(f"{path}: permission denied ({_one_line(e.message)})") from None
    except tf.errors.OpError as e:
        raise StorageError(f"{path}: {type(e).__name__}: {_one_line(e.message)}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- queries -----------------------------------------------------------------------------------


def exists(path: str) -> bool:
    """Whether a file or folder exists at ``path``."""
    if is_local(path):
        return os.path.exists(_local(path))
    with _translated(path):
        return _gfile().exists(path)


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder."""
    if is_local(path):
        return os.path.isdir(_local(path))
    with _translated(path):
        return _gfile().isdir(path)


def isfile(path: str) -> bool:
    """Whether ``path`` is an existing file (not a folder)."""
    if is_local(path):
        return os.path.isfile(_local(path))
    with _translated(path):
        return _gfile().exists(path) and not _gfile().isdir(path)


def size(path: str) -> int:
    """Size of the file at ``path`` in bytes."""
    if is_local(path):
        return os.stat(_local(path)).st_size
    with _translated(path):
        return _gfile().stat(path).length


def listdir(path: str) -> list[str]:
    """Sorted names (not paths) of the entries of folder ``path``."""
    if is_local(path):
        return sorted(os.listdir(_local(path)))
    with _translated(path):
        return sorted(name.rstrip("/") for name in _gfile().listdir(path))


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """Top-down ``(folder, subfolders, files)`` like ``os.walk``; prune by editing subfolders.

    Local walks do not follow symbolic links to folders (they are listed as
    subfolders but not entered), as ``os.walk``.
    """
    if is_local(top):
        yield from os.walk(_local(top))
        return
    with _translated(top):
        names = listdir(top)
        folders = [n for n in names if _gfile().isdir(join(top, n))]
    files = sorted(set(names) - set(folders))
    yield top, folders, files
    for folder in folders:
        yield from walk(join(top, folder))


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a ``*``/``?``/``[...]`` pattern (local or URL)."""
    if is_local(pattern):
        import glob as _glob

        return sorted(_glob.glob(_local(pattern)))
    with _translated(pattern):
        return sorted(_gfile().glob(pattern))


# --- reading -----------------------------------------------------------------------------------


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _refuse_special(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise NotRegularFile(f"{path}: is {kind}, not a regular file; refusing to read it")


def _open_regular(path: str) -> int:
    """A read-only descriptor of the regular file at local ``path``.

    Why: opening a FIFO blocks until a writer appears, and a link to ``/dev/zero``
    reads forever. The path is checked with ``stat`` before it is opened, opened
    with ``O_NONBLOCK`` (so even a FIFO swapped in meanwhile cannot block) and
    checked again on the open descriptor.
    """
    _refuse_special(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _refuse_special(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: str, mode: str = "rb") -> IO[Any]:
    """A file object for ``path``; read modes of URLs return an in-memory copy.

    Use :func:`publish_bytes` rather than write modes for anything another
    process or a resumed job reads.
    """
    reading = "r" in mode and "+" not in mode
    if is_local(path):
        return os.fdopen(_open_regular(_local(path)), mode) if reading else open(_local(path), mode)
    if reading:
        import io

        data = read_bytes(path)
        return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))
    with _translated(path):
        return _gfile().GFile(path, mode)


def open_reader(path: str) -> IO[bytes]:
    """A seekable binary reader that reads on demand (URLs too, where :func:`open_file`
    copies the whole object first): for files read piece by piece."""
    if is_local(path):
        return os.fdopen(_open_regular(_local(path)), "rb")
    with _translated(path):
        return _gfile().GFile(path, "rb")


def read_bytes(path: str) -> bytes:
    """The whole content of the file at ``path``."""
    if is_local(path):
        with open_file(path, "rb") as f:
            return f.read()
    with _translated(path):
        if _gfile().isdir(path):
            raise IsADirectoryError(f"{path}: is a folder")
        with _gfile().GFile(path, "rb") as f:
            return f.read()


def read_text(path: str) -> str:
    """The whole content of a UTF-8 text file."""
    return read_bytes(path).decode("utf-8")


def read_lines(path: str) -> Iterator[bytes]:
    """The lines of a file (with their ``\\n``), streamed rather than read whole."""
    if is_local(path):
        with open_file(path, "rb") as f:
            yield from f
        return
    with _translated(path), _gfile().GFile(path, "rb") as f:
        while line := f.readline():
            yield line if isinstance(line, bytes) else line.encode("utf-8")


def sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (streamed for local files)."""
    digest = hashlib.sha256()
    if is_local(path):
        with open_file(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(read_bytes(path))
    return digest.hexdigest()


JSON_MAX_BYTES = 1 << 20  # config and info files are a few kB
JSON_MAX_DEPTH = 32  # theirs is at most 4
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (linear; no recursion)."""
    import numpy as np

    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    opens = (bare == ord("[")) | (bare == ord("{"))
    closes = (bare == ord("]")) | (bare == ord("}"))
    depth = np.cumsum(opens.astype(np.int64) - closes)
    return int(depth.max()) if depth.size else 0


def read_json_object(path: str) -> dict:
    """A JSON object file (config.json, model_info.json, ...), checked before it is parsed.

    Refused with one ``ValueError`` naming the file: more than :data:`JSON_MAX_BYTES`,
    nested deeper than :data:`JSON_MAX_DEPTH`, not UTF-8, not valid (e.g. truncated)
    JSON, or a value that is not an object (``null``, a list, ...).
    """
    length = size(path)
    if length > JSON_MAX_BYTES:
        raise ValueError(
            f"{path}: {length} bytes; a JSON config file may have at most {JSON_MAX_BYTES}"
        )
    data = read_bytes(path)[: JSON_MAX_BYTES + 1]
    if len(data) > JSON_MAX_BYTES:
        raise ValueError(f"{path}: more than {JSON_MAX_BYTES} bytes (the file is growing?)")
    depth = _json_depth(data)
    if depth > JSON_MAX_DEPTH:
        raise ValueError(
            f"{path}: JSON nested {depth} levels deep; at most {JSON_MAX_DEPTH} are allowed"
        )
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        ends = e.pos >= len(data.rstrip()) or e.msg.startswith("Unterminated")
        what = "truncated" if ends else "not valid JSON"
        raise ValueError(f"{path}: {what} ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {json.dumps(value)[:40]}")
    return value


# --- writing -----------------------------------------------------------------------------------

# Folders this process already created: object stores pay a request per makedirs.
_made: set[str] = set()


def makedirs(path: str) -> None:
    """Creates folder ``path`` and its parents (no error if it exists)."""
    if is_local(path):
        os.makedirs(_local(path) or ".", exist_ok=True)
        return
    if path in _made:
        return
    with _translated(path):
        _gfile().makedirs(path)
    _made.add(path)


def temp_name(path: str, tag: str = "") -> str:
    """The temporary sibling :func:`publish_bytes` uses for ``path`` (``tag`` e.g. a process)."""
    folder, name = os.path.split(_local(path))
    return os.path.join(folder, f".{name}{TEMP_MARKER}-{tag}-{uuid.uuid4().hex}")


def is_temp_name(name: str, tag: str | None = None) -> bool:
    """Whether a file name is a (possibly orphaned) temporary of :func:`publish_bytes`."""
    marker = TEMP_MARKER + ("-" if tag is None else f"-{tag}-")
    return name.startswith(".") and marker in name


def publish_bytes(path: str, data: bytes, *, tag: str = "") -> None:
    """Makes ``data`` the content of ``path`` atomically (see the module's publication rule).

    Creates missing parent folders. A kill during a local publication can
    leave a temporary file (:func:`is_temp_name`, with ``tag``), never a partial
    target; callers remove their own orphans on restart.
    """
    publish_chunks(path, [data], tag=tag)


def publish_chunks(path: str, chunks: Iterable[bytes], *, tag: str = "") -> None:
    """:func:`publish_bytes` for content produced piece by piece (never all in memory).

    Local errors name ``path`` too (a full disk must say which file it could not write).
    """
    if not is_local(path):
        _publish(path, chunks, tag)
        return
    try:
        _publish(path, chunks, tag)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} (writing {path})") from e


def _publish(path: str, chunks: Iterable[bytes], tag: str) -> None:
    makedirs(dirname(path) or ".")
    if scheme(path) in _RENAME_STORES:
        temp = join(dirname(path), basename(temp_name(path, tag)))
        with _translated(path):
            with _gfile().GFile(temp, "wb") as f:
                f.write(b"")  # GFile creates nothing until its first write
                for chunk in chunks:
                    f.write(chunk)
            _gfile().rename(temp, path, overwrite=True)
        return
    if not is_local(path):
        with _translated(path), _gfile().GFile(path, "wb") as f:
            f.write(b"")
            for chunk in chunks:
                f.write(chunk)
        return
    temp = temp_name(path, tag)
    try:
        with open(temp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, _local(path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise


def append_bytes(path: str, data: bytes) -> None:
    """Appends to a small log file. Object stores cannot append: the whole file is read and
    published again (fine for logs of thousands of lines, never for bookkeeping)."""
    if is_local(path):
        with open(_local(path), "ab") as f:
            f.write(data)
        return
    old = read_bytes(path) if exists(path) else b""
    publish_bytes(path, old + data)


def remove(path: str) -> None:
    """Deletes the file at ``path``."""
    if is_local(path):
        os.remove(_local(path))
        return
    with _translated(path):
        _gfile().remove(path)


def rmtree(path: str) -> None:
    """Deletes folder ``path`` and everything under it (no error if absent)."""
    if is_local(path):
        if os.path.isdir(_local(path)):
            shutil.rmtree(_local(path))
        return
    with _translated(path):
        if _gfile().exists(path):
            _gfile().rmtree(path)
    _made.difference_update({p for p in _made if p == path or p.startswith(path.rstrip("/") + "/")})


def check_writable(folder: str) -> None:
    """Fails at once, with one clear line, if ``folder`` cannot be created and written.

    Publishes and deletes a small probe file. For ``gs://`` the message says
    how to provide credentials. Nothing is created locally for a URL.
    """
    probe = join(folder, f".sdedit-write-check-{uuid.uuid4().hex}")
    try:
        makedirs(folder)
        publish_bytes(probe, b"ok")
        remove(probe)
    except OSError as e:
        hint = ""
        if scheme(folder) == "gs":
            hint = (
                " (Google Cloud Storage needs credentials: run `gcloud auth "
                "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS, and "
                "check that the bucket exists and you may write to it)"
            )
        raise StorageError(f"{folder}: cannot write here: {_one_line(str(e))}{hint}") from None


def _stale_prefix(path: str) -> str:
    return f".{os.path.basename(path)}{TEMP_MARKER}-"


def _lock(fd: int) -> bool:
    """An exclusive ``flock`` on ``fd`` if free; ``False`` if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # a file system without locks: nothing can be proven stale
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
            return False
        raise
    return True


def remove_stale_folders(path: str) -> None:
    """Removes the temporary siblings of ``path`` that killed :func:`publish_folder` calls left.

    A publication holds a lock on its temporary folder until the rename, and the
    kernel drops it when the process dies; a folder whose lock is free is stale.
    """
    parent = os.path.dirname(os.path.abspath(path))
    prefix = _stale_prefix(path)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if not name.startswith(prefix):
            continue
        candidate = os.path.join(parent, name)
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone meanwhile, or not a folder
            continue
        try:
            if _lock(fd):
                shutil.rmtree(candidate, ignore_errors=True)
        finally:
            os.close(fd)


def _only_temporaries(path: str) -> bool:
    return os.path.isdir(path) and all(is_temp_name(n) for n in os.listdir(path))


def _refuse_existing(path: str) -> None:
    if is_local(path):
        if _only_temporaries(path):  # left by a publication killed before this rule existed
            shutil.rmtree(path)
        elif os.path.lexists(path):
            raise FileExistsError(f"{path}: already exists")
    elif exists(path):
        raise FileExistsError(f"{path}: already exists")


@contextlib.contextmanager
def publish_folder(path: str, *, replace: bool = False) -> Iterator[str]:
    """A new folder ``path`` published whole: fill the yielded folder; on success it is ``path``.

    Local: the yielded folder is a temporary sibling (:func:`temp_name`), locked
    while it is filled and renamed to ``path`` at the end, so ``path`` never shows
    a partial folder nor a mix of an old and a new one. Temporary siblings of
    killed publications are removed first (:func:`remove_stale_folders`), and
    the temporary folder is removed when filling it fails.

    Without ``replace`` an existing ``path`` is refused (``FileExistsError``),
    before and again at the rename: of two publications racing for one ``path``
    the second fails and nothing of it remains. With ``replace`` an existing
    ``path`` is moved aside, the new folder renamed into place and the old one
    deleted. URLs (object stores cannot rename a folder) are filled in place.
    """
    if not is_local(path):
        if replace:
            rmtree(path)
        _refuse_existing(path)
        makedirs(path)
        yield path
        return
    target = os.path.abspath(_local(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    remove_stale_folders(target)
    if not replace:
        _refuse_existing(target)
    temp = temp_name(target, "new")
    os.mkdir(temp)
    fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _lock(fd)
        yield temp
        os.fsync(fd)
        old = None
        if replace and os.path.lexists(target):
            old = temp_name(target, "old")
            os.rename(target, old)
        try:
            os.rename(temp, target)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(
                    f"{path}: already exists (another publication finished first)"
                ) from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        parent = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(parent)
        finally:
            os.close(parent)
    finally:
        os.close(fd)
        shutil.rmtree(temp, ignore_errors=True)
