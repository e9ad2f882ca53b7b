"""Outputs of batch edit jobs: images, JSONL manifests, crash-safe resume.

Layout of a job's ``workdir`` (shared by all hosts)::

    images/<name>.png          the output as 8-bit PNG (from [-1, 1]), if png
    arrays/<stem>.npz          the float32 output (key "image"), if npz="per_example"
    arrays/p00003.<run>.<n>.npz    one npz per written batch (keys "id", "image"),
                               if npz="shards"; rows name the file and "npz_index"
    manifest.p00003.<run>.<n>.jsonl   completion records of process 3: one file
                               per written batch, rows of its finished examples
    failures.p00003.<run>.<n>.jsonl   the same for rows {id, source, reason}
    manifest.jsonl, failures.jsonl   sorted and deduplicated by ``finalize``,
                               which then deletes the per-batch records it merged

``<name>`` is the example id made file-system safe by an injective rule
(:func:`sdedit_jax.data.names.output_name`: ``cat.png`` -> ``cat.png``,
``cat.jpg`` -> ``cat.jpg~.png``, ``Cat 1.png`` -> ``Cat_1~<hash>.png``).

Crash safety: every file, the records included, is *published* with
:func:`sdedit_jax.util.files.publish_bytes` (local: temporary file, fsync, rename;
object stores such as ``gs://``: one upload of the final object, never an
append), so a file is either absent or complete. A batch's completion record
is published only after all of its outputs, so an example counts as done
when a row names it; on local disks its outputs must also be the files that
were written: a row records each output's byte size and sha256
(``output_size``, ``output_sha256``; ``npz_size``, ``npz_sha256``), taken from
the bytes in memory when they are written, and a resume keeps an output only
if both match (a truncated or corrupt file is redone; rows of older versions
without them need a non-empty file). Resume reads and hashes every output
once, on one thread per core (hashlib releases the GIL); ``finalize`` checks
sizes only. On object stores the publication order is trusted (checking
would cost one request per example). A kill can therefore leave at most an
orphan temporary file (removed by the next sink of that process) or outputs
without a record (redone and atomically replaced, with identical content).
Every sink writes records under its own ``<run>`` name, so two writers never
replace each other's records. Rows hold only fields that are functions of the
example and the job (no timestamps), so ``finalize`` after any number of
restarts gives the same files as an uninterrupted run.

Ids the file system cannot hold (a path over ``names.MAX_PATH_BYTES`` bytes or
over ``names.MAX_FOLDERS`` folder levels, or one it refuses as too long) fail
their row; every other row of the batch is written.

Per-row inputs: a manifest row records ``inputs``, the digest of the row's
inputs (:mod:`sdedit_jax.jobs.row_inputs`), when the job gives the sink a
table of them; a failure row with ``inputs_changed`` (an id already done whose
inputs changed) is kept by ``finalize`` beside the earlier output's row.

No links: the job writes only inside its workdir. :func:`remove_orphan_temps`
(run by every sink, and by the job on the whole workdir before any work)
refuses a workdir holding a symbolic link (:class:`LinkInWorkdir`), so no
write can follow one out of it.

Bounded bookkeeping: resume reads the records as a stream and keeps only an
8-byte hash per finished id (:class:`CompletedIds`), not the rows or id strings.

Failure policy: a failed example (bad input or non-finite output) is recorded
once and, being deterministic, is not retried on resume; pass
``retry_failed=True`` to :func:`completed_ids` to retry failures (e.g. after
fixing the files). ``finalize`` drops failure rows of ids that later succeeded.

Writes run on a pool of writer threads (default: one per CPU core; PNG
encoding and zlib release the GIL) behind a bounded queue of batches, so the
device loop only waits on disk when the disk is slower than the device. The
first writer error is raised by the next ``write*`` call and by ``close``;
none is lost.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import io
import itertools
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from sdedit_jax.data import names
from sdedit_jax.data.images import to_uint8
from sdedit_jax.data.names import output_name, output_stem  # noqa: F401  (the sink's naming)
from sdedit_jax.jobs import workdir_lock
from sdedit_jax.util import files

MANIFEST = "manifest"
FAILURES = "failures"
RESERVED_FIELDS = (
    "id",
    "source",
    "output",
    "output_size",
    "output_sha256",
    "npz",
    "npz_size",
    "npz_sha256",
    "npz_index",
    "t0",
    "seed",
    "inputs",
    "reason",
    "inputs_changed",
)
OUTPUT_KEYS = ("output", "npz")
NPZ_MODES = ("none", "per_example", "shards")


# Optional per-row integer columns a batch may carry into its manifest rows: the
# example's reverse steps per repeat and its network calls (NFE) in total.
PER_ROW_COUNTS = ("steps", "nfe")


class SinkError(RuntimeError):
    """One or more background writes failed."""


LinkInWorkdir = workdir_lock.LinkInWorkdir


def _temp_tag(process_index: int) -> str:
    return f"p{process_index:05d}"


def atomic_write_bytes(path: str, data: bytes, *, process_index: int = 0) -> None:
    """Publishes ``data`` at ``path`` (see :func:`sdedit_jax.util.files.publish_bytes`).

    Errors name ``path`` (a full disk must say which file it could not write).
    """
    try:
        files.publish_bytes(path, data, tag=_temp_tag(process_index))
    except OSError as e:
        raise _naming(e, path) from e


def _naming(error: OSError, path: str) -> OSError:
    """An OSError that names ``path`` (a full disk must say which file it could not write)."""
    return OSError(error.errno, f"{error.strerror or error} (writing {path})")


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG encoding of a ``[H, W, 1 or 3]`` image in ``[-1, 1]``.

    ``compress_level`` is zlib's 0..9: 1 encodes several times faster than the
    default 6 for files about 10-30 % larger; pixels are identical.
    """
    pixels = to_uint8(image)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _json_value(value: Any) -> Any:
    """JSON-ready copy; float32 values keep the 7 digits that round-trip them."""
    if isinstance(value, (np.floating, float)) and np.asarray(value).dtype == np.float32:
        return float(f"{float(value):.7g}")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _jsonl_line(row: Mapping[str, Any]) -> str:
    return (
        json.dumps({k: _json_value(v) for k, v in row.items()}, sort_keys=True, allow_nan=False)
        + "\n"
    )


def _process_files(workdir: str, kind: str) -> list[str]:
    """Completion records of every process (older single-file ones included), oldest first."""
    return files.glob(files.join(_glob_escape(workdir), f"{kind}.p[0-9]*.jsonl"))


def _glob_escape(path: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _parse_block(lines: list[bytes]) -> list[Any]:
    """The JSON values of complete lines; one C-level parse per block when all are valid."""
    try:
        # Lines hold no raw newlines (JSON escapes them), so they join into one array.
        values = json.loads(b"[" + b",".join(lines) + b"]")
        if len(values) == len(lines):  # else a broken line merged with another
            return values
    except ValueError:
        pass
    values = []
    for line in lines:
        try:
            values.append(json.loads(line))
        except ValueError:  # UnicodeDecodeError included
            values.append(None)
    return values


def _row_blocks(path: str, block: int = 4096) -> Iterator[list[tuple[dict | None, bytes]]]:
    """Lists of ``(row, line)`` for up to ``block`` non-blank lines of a JSONL file.

    ``row`` is None if the line is unparseable. A parseable row is a JSON object
    with a string ``id``. Published records are never partial; unparseable
    lines can only come from hand edits or files of older versions, and their
    examples are redone. Parsing a block at a time makes a resume over a
    million rows take seconds.
    """
    pending: list[bytes] = []

    def parsed() -> list[tuple[dict | None, bytes]]:
        rows = [
            (value if isinstance(value, dict) and isinstance(value.get("id"), str) else None, line)
            for value, line in zip(_parse_block(pending), pending, strict=True)
        ]
        pending.clear()
        return rows

    try:
        for line in files.read_lines(path):
            line = line.rstrip(b"\r\n")
            if line.strip():
                pending.append(line)
            if len(pending) == block:
                yield parsed()
    except FileNotFoundError:
        return
    if pending:
        yield parsed()


def _iter_rows(path: str, block: int = 4096) -> Iterator[tuple[dict | None, bytes]]:
    """``(row, line)`` per non-blank line of a JSONL file (see :func:`_row_blocks`)."""
    for rows in _row_blocks(path, block):
        yield from rows


def read_rows(path: str) -> tuple[list[dict], int]:
    """Parseable rows (JSON objects with a string ``id``) of a JSONL file, and how many others."""
    rows, bad = [], 0
    for row, _ in _iter_rows(path):
        if row is None:
            bad += 1
        else:
            rows.append(row)
    return rows, bad


_Output = tuple[str, Any, Any]  # (path under the workdir, recorded size, recorded sha256)


def _outputs(row: Mapping[str, Any]) -> list[_Output] | None:
    """A row's output files with what it recorded of them (None: the row names none)."""
    found = [
        (row[k], row.get(f"{k}_size"), row.get(f"{k}_sha256")) for k in OUTPUT_KEYS if k in row
    ]
    if not found or not all(isinstance(path, str) for path, _, _ in found):
        return None
    return found


def _file_ok(workdir: str, output: _Output, content: bool) -> bool:
    """Whether an output is the file that was written: its size and (``content``) sha256.

    Rows of older versions record neither: their file must exist and not be empty.
    """
    path, size, sha256 = output
    full = os.path.join(workdir, path)
    try:
        info = os.stat(full)
    except (OSError, ValueError):
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        return False
    if isinstance(size, int) and info.st_size != size:
        return False
    if content and isinstance(sha256, str):
        try:
            return files.sha256(full) == sha256
        except OSError:
            return False
    return True


def _output_exists(workdir: str, row: Mapping[str, Any], local: bool | None = None) -> bool:
    """Whether a row's outputs are in place, by their sizes (the cheap check of ``finalize``)."""
    outputs = _outputs(row)
    if outputs is None:
        return False
    if not (files.is_local(workdir) if local is None else local):
        return True  # the publication order guarantees it (see the module docstring)
    return all(_file_ok(workdir, output, content=False) for output in outputs)


def _verified(
    workdir: str, rows: list[Mapping[str, Any]], pool: concurrent.futures.Executor | None
) -> list[bool]:
    """Per row: whether its outputs are the files written (size and sha256), checked on ``pool``.

    A file shared by rows (an npz shard) is checked once per block.
    """
    wanted = [_outputs(row) for row in rows]
    if pool is None:  # object stores: the publication order guarantees it
        return [outputs is not None for outputs in wanted]
    unique = list(dict.fromkeys(o for outputs in wanted if outputs for o in outputs))
    ok = dict(zip(unique, pool.map(lambda o: _file_ok(workdir, o, True), unique), strict=True))
    return [outputs is not None and all(ok[o] for o in outputs) for outputs in wanted]


def _record_files(workdir: str, kind: str) -> list[str]:
    """The consolidated file, then every process's records (later ones win)."""
    return [files.join(workdir, f"{kind}.jsonl")] + _process_files(workdir, kind)


def _input_digest(row: Mapping[str, Any]) -> int:
    """The row's recorded ``inputs`` digest, 0 if it has none (rows of older versions)."""
    value = row.get("inputs")
    try:
        return int(value, 16) if isinstance(value, str) and len(value) == 16 else 0
    except ValueError:
        return 0


def _completed_stream(workdir: str, retry_failed: bool) -> Iterator[tuple[list[str], list[int]]]:
    """``(ids, input digests)`` of failed ids (unless retried; digest 0), then of manifest rows
    whose outputs check (last, so that a finished id's digest wins in :class:`CompletedIds`)."""
    if not retry_failed:
        for path in _record_files(workdir, FAILURES):
            for block in _row_blocks(path):
                ids = [row["id"] for row, _ in block if row is not None]
                yield ids, [0] * len(ids)
    with contextlib.ExitStack() as stack:
        pool = None
        if files.is_local(workdir):
            pool = stack.enter_context(
                concurrent.futures.ThreadPoolExecutor(default_writer_threads(), "sink-verify")
            )
        for path in _record_files(workdir, MANIFEST):
            for block in _row_blocks(path):
                rows = [row for row, _ in block if row is not None]
                done = [
                    row for row, ok in zip(rows, _verified(workdir, rows, pool), strict=True) if ok
                ]
                yield [row["id"] for row in done], [_input_digest(row) for row in done]


def manifest_rows_of(workdir: str, ids: Iterable[str]) -> dict[str, dict]:
    """The latest manifest row of each of ``ids`` (one stream over the records; for few ids)."""
    wanted, found = set(ids), {}
    for path in _record_files(workdir, MANIFEST):
        for row, _ in _iter_rows(path):
            if row is not None and row["id"] in wanted:
                found[row["id"]] = row
    return found


def _utf8(ids: Iterable[str | bytes] | np.ndarray) -> np.ndarray:
    """Ids as a fixed-width bytes array (``S``) of their UTF-8 encodings."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        return ids
    if not isinstance(ids, np.ndarray):
        ids = np.array(
            [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in ids], dtype=str
        )
    try:
        return ids.astype("S")  # ASCII ids: a fast C conversion
    except UnicodeEncodeError:
        return np.char.encode(ids, "utf-8", "surrogatepass")  # a lone surrogate too


def _mix(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: every input bit reaches every output bit."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def id_hashes(ids: Iterable[str | bytes] | np.ndarray) -> np.ndarray:
    """64-bit hashes of ids (uint64): the key of :class:`CompletedIds`.

    The UTF-8 bytes are read as little-endian 64-bit words (zero-padded), each
    folded in with the splitmix64 finaliser, and the length last; vectorised
    over ids with numpy (a million ids in about a second on a slow core; a
    loop of ``hashlib`` calls is several times slower). Distinct ids share a
    hash only by chance.
    """
    raw = _utf8(ids)
    if raw.size == 0:
        return np.zeros(0, np.uint64)
    lengths = np.char.str_len(raw).astype(np.uint64)
    width = -(-raw.dtype.itemsize // 8) * 8
    padded = raw.astype(f"S{width}")
    words = np.frombuffer(padded.tobytes(), "<u8").reshape(len(raw), width // 8)
    hashes = np.full(len(raw), 0x9E3779B97F4A7C15, np.uint64)
    with np.errstate(over="ignore"):
        for column in range(int(-(-int(lengths.max()) // 8))):
            live = np.uint64(8 * column) < lengths
            hashes = np.where(live, _mix(hashes ^ words[:, column]), hashes)
        return _mix(hashes ^ lengths)


class CompletedIds:
    """A compact set of finished ids: their sorted 64-bit hashes (8 bytes per id).

    Why: a Python set of a million id strings costs about 100 MB per host and
    seconds to build; this costs 8 MB. Two distinct ids share a hash with
    probability about n^2 / 2^65 (3e-8 for a million ids): the cost of a
    collision would be one example skipped as done.

    ``digests`` (aligned with ``hashes``, 8 more bytes per id) are the recorded
    input digests of finished ids (0: unknown); of an id given twice the last wins.
    """

    def __init__(self, hashes: np.ndarray, digests: np.ndarray | None = None):
        hashes = np.asarray(hashes, np.uint64)
        digests = np.zeros(len(hashes), np.uint64) if digests is None else digests
        order = np.argsort(hashes, kind="stable")
        hashes, digests = hashes[order], np.asarray(digests, np.uint64)[order]
        last = np.concatenate((hashes[1:] != hashes[:-1], [True])) if len(hashes) else []
        self._hashes, self._digests = hashes[last], digests[last]

    @classmethod
    def from_ids(cls, ids: Iterable[str], chunk: int = 1 << 16) -> CompletedIds:
        """The index of ``ids`` (a stream: hashed in chunks, never held as strings)."""
        parts, pending = [], []
        for example_id in ids:
            pending.append(example_id)
            if len(pending) == chunk:
                parts.append(id_hashes(pending))
                pending = []
        parts.append(id_hashes(pending))
        return cls(np.concatenate(parts))

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, example_id: object) -> bool:
        return bool(self.contains([example_id])[0])

    def _find(self, ids: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = id_hashes(ids)
        if not len(self._hashes):
            return np.zeros(len(keys), np.intp), np.zeros(len(keys), bool)
        where = np.minimum(np.searchsorted(self._hashes, keys), len(self._hashes) - 1)
        return where, self._hashes[where] == keys

    def contains(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Boolean membership of every id (vectorised over the hashes)."""
        return self._find(ids)[1]

    def digests(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """The recorded input digest of every id (uint64; 0 where unknown or not finished)."""
        where, found = self._find(ids)
        if not len(self._digests):
            return np.zeros(len(found), np.uint64)
        return np.where(found, self._digests[where], np.uint64(0))


def completed_ids(workdir: str, *, retry_failed: bool = False) -> set[str]:
    """Ids that need no more work: finished (row and outputs present) or failed.

    For small jobs and tests; jobs use :func:`completed_index` (bounded memory).

    Args:
        workdir: the job's output folder (all processes' files are read).
        retry_failed: leave failed ids out, so they are tried again.
    """
    return {i for ids, _ in _completed_stream(workdir, retry_failed) for i in ids}


def completed_index(workdir: str, *, retry_failed: bool = False) -> CompletedIds:
    """The ids of :func:`completed_ids` as a compact :class:`CompletedIds`, with input digests."""
    hashes, digests = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for ids, values in _completed_stream(workdir, retry_failed):
        hashes.append(id_hashes(ids))
        digests.append(np.array(values, np.uint64))
    return CompletedIds(np.concatenate(hashes), np.concatenate(digests))


def failed_index(workdir: str) -> CompletedIds:
    """The ids with a failure row (no output is read: a dry run needs no second check)."""
    hashes = [np.zeros(0, np.uint64)]
    for path in _record_files(workdir, FAILURES):
        for block in _row_blocks(path):
            hashes.append(id_hashes([row["id"] for row, _ in block if row is not None]))
    return CompletedIds(np.concatenate(hashes))


@dataclasses.dataclass(frozen=True)
class FinalizeSummary:
    """What ``finalize`` wrote and what it left out (and why)."""

    manifest_rows: int
    failure_rows: int
    ignored_lines: int
    missing_outputs: list[str]
    changed_inputs: int = 0  # failure rows of ids that also keep their earlier output's row


def _write_jsonl(path: str, rows: list[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(_jsonl_line(row) for row in rows).encode())


def _latest_lines(
    workdir: str, kind: str
) -> tuple[dict[str, tuple[dict, bytes, bool]], int, list[str]]:
    """Last row, its line and whether it is a per-batch record, of every id; bad lines; files."""
    latest, bad, read = {}, 0, []
    for index, path in enumerate(_record_files(workdir, kind)):
        read.append(path)
        for row, line in _iter_rows(path):
            if row is None:
                bad += 1
            else:
                latest[row["id"]] = (row, line + b"\n", index > 0)
    return latest, bad, read


def finalize(workdir: str) -> FinalizeSummary:
    """Writes ``manifest.jsonl`` and ``failures.jsonl``: one row per id, sorted by id.

    Call once after every process has closed its sink (e.g. on process 0
    after a barrier). Rows whose outputs are missing are left out and listed
    in the summary (a rerun redoes them); failure rows of ids that succeeded
    are dropped, except ``inputs_changed`` rows of the records being merged
    (a job checks every finished id's inputs on each run and writes them
    again while they differ). The per-batch records merged into the two files
    are then deleted (a kill in between leaves duplicates, merged again).
    """
    manifest, bad_rows, manifest_files = _latest_lines(workdir, MANIFEST)
    missing = sorted(i for i, (row, *_) in manifest.items() if not _output_exists(workdir, row))
    for example_id in missing:
        del manifest[example_id]
    failures, bad_failures, failure_files = _latest_lines(workdir, FAILURES)
    changed = 0
    for example_id in set(failures) & set(manifest):
        row, _, new = failures[example_id]
        if new and row.get("inputs_changed"):
            changed += 1
        else:
            del failures[example_id]
    for kind, latest in ((MANIFEST, manifest), (FAILURES, failures)):
        path = files.join(workdir, f"{kind}.jsonl")
        try:
            files.publish_chunks(path, (latest[i][1] for i in sorted(latest)), tag=_temp_tag(0))
        except OSError as e:
            raise _naming(e, path) from e
    for path in manifest_files[1:] + failure_files[1:]:
        try:
            files.remove(path)
        except FileNotFoundError:
            pass
    return FinalizeSummary(len(manifest), len(failures), bad_rows + bad_failures, missing, changed)


def remove_orphan_temps(workdir: str, process_index: int, *, recursive: bool = True) -> None:
    """Deletes temporary files this process left behind when it was killed; refuses links.

    Output names never start with ``.`` (see :mod:`sdedit_jax.data.names`), so
    no output can be mistaken for a temporary file. Object stores have none
    (objects are uploaded whole). A symbolic link anywhere in the walk raises
    :class:`LinkInWorkdir` naming it: the job writes only inside its workdir,
    and a planted link (``images`` -> elsewhere) would take writes out of it.
    The walk is iterative (``os.scandir``, one ``lstat``-free pass per folder).
    """
    if not files.is_local(workdir) or not os.path.isdir(workdir):
        return
    tag = _temp_tag(process_index)
    pending = [files.abspath(workdir)]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink():
                    raise workdir_lock.link_refused(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(entry.path)
                elif files.is_temp_name(entry.name, tag):
                    os.remove(entry.path)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def default_writer_threads() -> int:
    """Writer threads when none are configured: one per CPU core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Sink:
    """Writes one process's outputs, manifest rows and failures on background threads.

    Use as a context manager or call ``close()``; it waits for pending writes
    and raises ``SinkError`` if any failed.
    """

    def __init__(
        self,
        workdir: str,
        *,
        process_index: int = 0,
        job_fields: Mapping[str, Any] | None = None,
        png: bool = True,
        npz: str = "none",
        png_compression: int = 6,
        num_threads: int | None = None,
        max_pending: int | None = None,
        on_written: Callable[[int], None] | None = None,
        input_digests: Any = None,
    ):
        """Opens (and cleans after a crash) this process's files in ``workdir``.

        Args:
            workdir: the job's output folder, shared by all processes (any
                path :mod:`sdedit_jax.util.files` understands).
            process_index: this process; its files carry the index.
            job_fields: fields added to every manifest row (sampler, n_steps,
                model checksum, ...); they must not depend on time or host.
            png: write each output as an 8-bit PNG.
            npz: ``"none"``, ``"per_example"`` (one float32 npz per example) or
                ``"shards"`` (one npz per written batch, for bulk post-processing).
            png_compression: zlib level 0..9 of the PNGs.
            num_threads: image encoding/writing threads (default: one per core).
            max_pending: batches queued before ``write*`` blocks (default 2).
            on_written: called (on a writer thread) with a count of examples whose
                output files or failure row were just published (progress counts these).
            input_digests: the rows' input digests (``row_inputs.DigestTable``,
                anything with ``lookup(ids) -> uint64``; 0 = unknown), recorded
                as ``inputs`` in manifest rows.
        """
        if npz not in NPZ_MODES:
            raise ValueError(f"npz: expected one of {NPZ_MODES}, got {npz!r}")
        if not png and npz == "none":
            raise ValueError("outputs: png=False needs npz='per_example' or 'shards'")
        if not (isinstance(png_compression, int) and 0 <= png_compression <= 9):
            raise ValueError(f"png_compression: expected an int in 0..9, got {png_compression!r}")
        num_threads = default_writer_threads() if num_threads is None else num_threads
        if not (isinstance(num_threads, int) and num_threads >= 1):
            raise ValueError(f"num_threads: expected an int >= 1, got {num_threads!r}")
        self.workdir = workdir
        self.process_index = process_index
        self.png, self.npz, self.png_compression = png, npz, png_compression
        self.job_fields = dict(job_fields or {})
        self.input_digests = input_digests
        _check_fields(self.job_fields)
        files.makedirs(workdir)
        remove_orphan_temps(workdir, process_index)
        # Records of this sink are named p<process>.<run>.<n>: runs sort by start time,
        # and the random part keeps two writers (a double launch) from colliding.
        self._run = f"r{time.time_ns() // 1_000_000:013d}{uuid.uuid4().hex[:6]}"
        self._sequence = itertools.count()
        self._written = 0
        self._count_lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._error_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_pending or 2)
        # Batches are coordinated on one pool and their images encoded on another, so
        # a batch's record can wait for its images without starving the encoders.
        self._batches = concurrent.futures.ThreadPoolExecutor(max_pending or 2, "sink-batch")
        self._images = concurrent.futures.ThreadPoolExecutor(num_threads, "sink-writer")
        self._closed = False
        self._on_written = on_written or (lambda count: None)

    # --- public API ------------------------------------------------------------------------------

    @property
    def rows_written(self) -> int:
        """Examples whose output or failure row is published (progress counts these)."""
        with self._count_lock:
            return self._written

    def write(
        self,
        *,
        id: str,
        source: str,
        image: Any,
        t0: float,
        seed: int,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        """Queues one output ``image [H, W, C]`` in ``[-1, 1]`` (any array, e.g. a jax.Array)."""
        columns = {
            "id": np.array([id]),
            "source": np.array([source]),
            "t0": np.array([t0], np.float32),
            "seed": np.array([seed]),
            "valid": np.array([True]),
            "ok": np.array([True]),
            "error": np.array([""]),
        }
        self._submit(self._write_batch, columns, _Stacked(image), self._fields(fields))

    def write_failure(
        self,
        *,
        id: str,
        source: str,
        reason: str,
        fields: Mapping[str, Any] | None = None,
        inputs_changed: str = "",
    ) -> None:
        """Queues a failure row ``{id, source, reason}`` (plus ``fields``).

        ``inputs_changed`` names the input field of a finished id that changed
        (the row is then kept beside the earlier output's, see ``finalize``).
        """
        fields = self._fields(fields)
        if inputs_changed:
            fields["inputs_changed"] = inputs_changed
        columns = {
            "id": np.array([id]),
            "source": np.array([source]),
            "t0": np.zeros([1], np.float32),
            "seed": np.zeros([1], np.int64),
            "valid": np.array([True]),
            "ok": np.array([False]),
            "error": np.array([reason]),
        }
        self._submit(self._write_batch, columns, None, fields)

    def write_batch(
        self, batch: Mapping[str, Any], outputs: Any, fields: Mapping[str, Any] | None = None
    ) -> None:
        """Queues a batch from ``guide_inputs``: outputs for ok rows, failures for bad rows.

        The batch's rows are published as one completion record after all its
        outputs are in place.

        Args:
            batch: a batch of the guide stream as numpy (``id``, ``source``,
                ``t0``, ``seed``, ``valid``, ``ok``, ``error``, and optionally the
                per-row counts ``steps`` and ``nfe`` of :data:`PER_ROW_COUNTS`); padding rows
                (``valid`` False) are skipped.
            outputs: ``[B, H, W, C]`` outputs aligned with the batch; converted
                to numpy on the writer thread, so a jax.Array does not block
                the caller.
            fields: extra manifest fields for every row of the batch.
        """
        columns = {
            k: np.asarray(batch[k])
            for k in ("id", "source", "t0", "seed", "valid", "ok", "error") + PER_ROW_COUNTS
            if k in batch
        }
        self._submit(self._write_batch, columns, outputs, self._fields(fields))

    def close(self) -> None:
        """Waits for every queued write, raises ``SinkError`` on any failure."""
        if not self._closed:
            self._closed = True
            self._batches.shutdown(wait=True)
            self._images.shutdown(wait=True)
        self._raise_if_failed()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- background work ------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        with self._error_lock:
            errors = list(self._errors)
        if errors:
            summary = "; ".join(f"{type(e).__name__}: {e}" for e in errors[:5])
            raise SinkError(f"{len(errors)} background write(s) failed: {summary}") from errors[0]

    def _submit(self, fn, *args) -> None:
        if self._closed:
            raise SinkError("sink is closed")
        self._raise_if_failed()
        self._slots.acquire()
        try:
            future = self._batches.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._task_done)

    def _task_done(self, future: concurrent.futures.Future) -> None:
        self._slots.release()
        error = future.exception()
        if error is not None:
            with self._error_lock:
                self._errors.append(error)

    def _fields(self, fields: Mapping[str, Any] | None) -> dict[str, Any]:
        """Job fields plus per-call ``fields``, checked on the caller's thread."""
        merged = dict(self.job_fields, **(fields or {}))
        _check_fields(merged)
        return merged

    def _record_path(self, kind: str, sequence: int, extension: str = "jsonl") -> str:
        name = f"{kind}.{_temp_tag(self.process_index)}.{self._run}.{sequence:06d}.{extension}"
        return files.join(self.workdir, name)

    def _publish(self, relative: str, data: bytes) -> None:
        atomic_write_bytes(
            files.join(self.workdir, relative), data, process_index=self.process_index
        )

    def _output_paths(self, example_id: str) -> dict[str, str]:
        """The per-example files of an id: row key -> path under the workdir."""
        paths = {}
        if self.png:
            paths["output"] = f"images/{output_name(example_id)}"
        if self.npz == "per_example":
            paths["npz"] = f"arrays/{output_stem(example_id)}.npz"
        return paths

    def _path_problem(self, example_id: str) -> str:
        """Why the file system cannot hold an id's outputs (``""`` if it can)."""
        folders = output_name(example_id).count("/")
        for path in self._output_paths(example_id).values():
            full = files.join(self.workdir, path)
            problem = names.path_problem(files.abspath(full), folders=folders)
            if problem:
                return problem
        return ""

    def _write_image(self, example_id: str, image: np.ndarray) -> dict[str, Any] | str:
        """Publishes one example's per-example files; returns their row fields.

        Returns the reason instead if the file system refuses the path as too
        long (a limit below ``names.MAX_PATH_BYTES``): a fault of the id, not of the disk.
        """
        row: dict[str, Any] = {}
        for key, path in self._output_paths(example_id).items():
            if key == "output":
                data = png_bytes(image, self.png_compression)
            else:
                buffer = io.BytesIO()
                np.savez(buffer, image=image)
                data = buffer.getvalue()
            try:
                self._publish(path, data)
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise
                return f"its output path is too long for this file system ({os.strerror(e.errno)})"
            row.update(_file_fields(key, path, data))
        return row

    def _write_batch(
        self, columns: dict[str, np.ndarray], outputs: Any, fields: dict[str, Any]
    ) -> None:
        rows = np.flatnonzero(columns["valid"])
        good = [i for i in rows if columns["ok"][i]]
        images = np.asarray(outputs, np.float32) if good else None
        if images is not None and images.shape[0] != len(columns["id"]):
            raise ValueError(f"outputs: {images.shape[0]} rows for a batch of {len(columns['id'])}")
        manifest, failures, finite = [], [], []
        for i in rows:
            example_id, source = _text(columns["id"][i]), _text(columns["source"][i])
            base = {**fields, "id": example_id, "source": source}
            if not columns["ok"][i]:
                failures.append({**base, "reason": _text(columns["error"][i])})
                continue
            problem = self._path_problem(example_id)
            if problem:
                failures.append({**base, "reason": f"id ({source}): {problem}"})
                continue
            image = images[i]
            if image.ndim != 3 or image.shape[-1] not in (1, 3):
                raise ValueError(
                    f"output of {example_id!r}: expected [H, W, 1 or 3], got shape {image.shape}"
                )
            bad = int(np.count_nonzero(~np.isfinite(image)))
            if bad:
                failures.append({**base, "reason": f"output: {bad} non-finite values"})
                continue
            finite.append(i)
            manifest.append(
                {
                    **base,
                    "t0": np.float32(columns["t0"][i]),
                    "seed": int(columns["seed"][i]),
                    **{k: int(columns[k][i]) for k in PER_ROW_COUNTS if k in columns},
                }
            )
        ids = [_text(columns["id"][i]) for i in finite]
        written = []
        for out in self._images.map(self._write_image, ids, [images[i] for i in finite]):
            written.append(out)
            if out and not isinstance(out, str):  # published now (the rest: with the record)
                self._on_written(1)
        counted = sum(1 for out in written if out and not isinstance(out, str))
        refused = [k for k, out in enumerate(written) if isinstance(out, str)]
        for k in refused:
            failures.append(
                {
                    **fields,
                    "id": ids[k],
                    "source": manifest[k]["source"],
                    "reason": f"id ({manifest[k]['source']}): {written[k]}",
                }
            )
        keep = [k for k, out in enumerate(written) if not isinstance(out, str)]
        manifest, written = [manifest[k] for k in keep], [written[k] for k in keep]
        finite, ids = [finite[k] for k in keep], [ids[k] for k in keep]
        if self.input_digests is not None and ids:
            for row, digest in zip(manifest, self.input_digests.lookup(ids), strict=True):
                if digest:
                    row["inputs"] = f"{int(digest):016x}"
        sequence = next(self._sequence)
        if self.npz == "shards" and finite:
            shard = self._record_path("arrays/part", sequence, "npz")
            buffer = io.BytesIO()
            np.savez(buffer, id=np.array(ids), image=images[finite])
            atomic_write_bytes(shard, buffer.getvalue(), process_index=self.process_index)
            relative = files.relpath(shard, self.workdir).replace(os.sep, "/")
            shard_fields = _file_fields("npz", relative, buffer.getvalue())
            for index, fields_written in enumerate(written):
                fields_written.update(shard_fields, npz_index=index)
        for kind, records in (
            (MANIFEST, [{**row, **extra} for row, extra in zip(manifest, written, strict=True)]),
            (FAILURES, failures),
        ):
            if records:
                path = self._record_path(kind, sequence)
                atomic_write_bytes(
                    path,
                    "".join(_jsonl_line(r) for r in records).encode(),
                    process_index=self.process_index,
                )
        stream_rows = 0 if "inputs_changed" in fields else len(rows)  # not rows of the stream
        with self._count_lock:
            self._written += stream_rows
        if stream_rows:
            self._on_written(stream_rows - counted)


def _file_fields(key: str, path: str, data: bytes) -> dict[str, Any]:
    """Row fields of a published file: its path, byte size and sha256 (of the bytes in memory)."""
    return {key: path, f"{key}_size": len(data), f"{key}_sha256": hashlib.sha256(data).hexdigest()}


class _Stacked:
    """One image as a batch of one, converted to numpy on the writer thread."""

    def __init__(self, image: Any):
        self._image = image

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._image, dtype)[None]


def _check_fields(fields: Mapping[str, Any]) -> None:
    clash = sorted(set(fields) & set(RESERVED_FIELDS))
    if clash:
        raise ValueError(f"fields: {clash} are written by the sink itself")
