"""The writer of batch edit jobs: images and their records, published crash-safe.

The records it writes are read back, indexed and merged by :mod:`sdedit_jax.jobs.manifest`.

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
inputs (:class:`sdedit_jax.jobs.manifest.DigestTable`), when the job gives the sink a
table of them; a failure row with ``inputs_changed`` (an id already done whose
inputs changed) is kept by ``finalize`` beside the earlier output's row.

No links: the job writes only inside its workdir. :func:`remove_orphan_temps`
(run by every sink, and by the job on the whole workdir before any work)
refuses a workdir holding a symbolic link (:class:`LinkInWorkdir`), so no
write can follow one out of it.

Writes run on a pool of writer threads (default: one per CPU core; PNG
encoding and zlib release the GIL) behind a bounded queue of batches, so the
device loop only waits on disk when the disk is slower than the device. The
first writer error is raised by the next ``write*`` call and by ``close``;
none is lost.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import io
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from sdedit_jax.data import names
from sdedit_jax.data.guide_inputs import micro
from sdedit_jax.data.images import to_uint8
from sdedit_jax.data.names import output_name, output_stem  # noqa: F401  (the sink's naming)
from sdedit_jax.jobs import workdir_lock
from sdedit_jax.jobs.manifest import FAILURES, MANIFEST, jsonl_line, process_tag, usable_cores
from sdedit_jax.util import files

# Optional per-row text columns (models that take prompts): what the edit used, and
# whether the tokenizer cut the prompt or the negative prompt at its length (77 tokens).
TEXT_COLUMNS = (
    "prompt",
    "negative_prompt",
    "guidance_scale",
    "prompt_truncated",
    "negative_prompt_truncated",
)
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
    *TEXT_COLUMNS,
    # SDXL's micro-conditioning as the edit used it (the row's own or the job's).
    *micro.FIELDS,
)
NPZ_MODES = ("none", "per_example", "shards")


# Optional per-row integer columns a batch may carry into its manifest rows: the
# example's reverse steps per repeat and its network calls (NFE) in total.
PER_ROW_COUNTS = ("steps", "nfe")


class SinkError(RuntimeError):
    """One or more background writes failed."""


LinkInWorkdir = workdir_lock.LinkInWorkdir


def atomic_write_bytes(path: str, data: bytes, *, process_index: int = 0) -> None:
    """Publishes ``data`` at ``path`` with this process's temporary name; errors name ``path``.

    See :func:`sdedit_jax.util.files.publish_bytes`; :func:`remove_orphan_temps` of
    the same process removes what a kill left.
    """
    files.publish_bytes(path, data, tag=process_tag(process_index))


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
    tag = process_tag(process_index)
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
            input_digests: the rows' input digests (``manifest.DigestTable``,
                anything with ``lookup(ids) -> uint64``; 0 = unknown), recorded
                as ``inputs`` in manifest rows.
        """
        if npz not in NPZ_MODES:
            raise ValueError(f"npz: expected one of {NPZ_MODES}, got {npz!r}")
        if not png and npz == "none":
            raise ValueError("outputs: png=False needs npz='per_example' or 'shards'")
        if not (isinstance(png_compression, int) and 0 <= png_compression <= 9):
            raise ValueError(f"png_compression: expected an int in 0..9, got {png_compression!r}")
        num_threads = usable_cores() if num_threads is None else num_threads
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
                per-row counts ``steps`` and ``nfe`` of :data:`PER_ROW_COUNTS` and the
                text of :data:`TEXT_COLUMNS` and SDXL micro-conditioning of
                ``micro.FIELDS``); padding rows (``valid`` False) are skipped.
            outputs: ``[B, H, W, C]`` outputs aligned with the batch; converted
                to numpy on the writer thread, so a jax.Array does not block
                the caller.
            fields: extra manifest fields for every row of the batch.
        """
        columns = {
            k: np.asarray(batch[k])
            for k in ("id", "source", "t0", "seed", "valid", "ok", "error")
            + PER_ROW_COUNTS
            + TEXT_COLUMNS
            + micro.FIELDS
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
        name = f"{kind}.{process_tag(self.process_index)}.{self._run}.{sequence:06d}.{extension}"
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
                    **_text_fields(columns, i),
                    **{k: micro.row_value(columns, k, i) for k in micro.FIELDS if k in columns},
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
                    "".join(jsonl_line(r) for r in records).encode(),
                    process_index=self.process_index,
                )
        stream_rows = 0 if "inputs_changed" in fields else len(rows)  # not rows of the stream
        with self._count_lock:
            self._written += stream_rows
        if stream_rows:
            self._on_written(stream_rows - counted)


def _text_fields(columns: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    """The row's text columns as manifest fields (none for a model that takes no text)."""
    out: dict[str, Any] = {}
    for key in TEXT_COLUMNS:
        if key in columns:
            value = columns[key][i]
            if key == "guidance_scale":
                out[key] = np.float32(value)
            elif key.endswith("_truncated"):
                out[key] = bool(value)
            else:
                out[key] = _text(value)
    return out


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
