"""Outputs of batch edit jobs: images, JSONL manifests, crash-safe resume.

Layout of a job's ``workdir`` (shared by all hosts)::

    images/<id>.png            the output as 8-bit PNG (from [-1, 1])
    arrays/<id>.npz            the float32 output (key "image"), if save_npz
    manifest.p00003.jsonl      rows appended by process 3, one per finished example
    failures.p00003.jsonl      rows {id, source, reason} appended by process 3
    manifest.jsonl, failures.jsonl   sorted and deduplicated by ``finalize``

``<id>`` is the example id made file-system safe (see :func:`output_stem`).

Crash safety: every file is written to a temporary name in its final folder,
fsynced and renamed over the target, so a file is either absent or complete.
A manifest row is appended (with flush and fsync) only after its PNG is in
place; an example counts as done when it has a parseable row whose output
exists. A kill can therefore leave at most an orphan temporary file, an
output without a row (redone and atomically replaced, with identical content),
or a truncated last line (ignored by readers; the example is redone). On start
a sink deletes its own process's orphans and rewrites its own files without
broken lines, so appends never extend a fragment. Rows hold only fields that
are functions of the example and the job (no timestamps), so ``finalize``
after any number of restarts gives the same files as an uninterrupted run.

Failure policy: a failed example (bad input or non-finite output) is recorded
once and, being deterministic, is not retried on resume; pass
``retry_failed=True`` to :func:`completed_ids` to retry failures (e.g. after
fixing the files). ``finalize`` drops failure rows of ids that later succeeded.

Writes run on a small thread pool behind a bounded queue, so the device loop
only waits on disk when the disk is slower than the device. The first writer
error is raised by the next ``write*`` call and by ``close``; none is lost.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

MANIFEST = "manifest"
FAILURES = "failures"
RESERVED_FIELDS = ("id", "source", "output", "npz", "t0", "seed", "reason")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 150


class SinkError(RuntimeError):
    """One or more background writes failed."""


def output_stem(example_id: str) -> str:
    """A relative, file-system-safe path for an id; ``/`` in ids becomes folders.

    Unsafe characters become ``_``, and a hash of the id is appended whenever
    the id had to change, so distinct ids never share a file.
    """
    parts = []
    for part in example_id.split("/"):
        safe = _UNSAFE_CHARS.sub("_", part)[:_MAX_NAME]
        parts.append("_" if safe in ("", ".", "..") else safe)
    stem = "/".join(parts)
    if stem != example_id:
        stem += "-" + hashlib.sha1(example_id.encode()).hexdigest()[:10]
    return stem


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Maps ``[-1, 1]`` floats to uint8 (clipped, rounded to nearest)."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _temp_tag(process_index: int) -> str:
    return f".tmp-p{process_index:05d}-"


def atomic_write_bytes(path: str, data: bytes, *, process_index: int = 0) -> None:
    """Writes ``data`` to ``path`` via a fsynced temporary file in the same folder and a rename."""
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    temp = os.path.join(folder, f".{name}{_temp_tag(process_index)}{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a ``[H, W, 1 or 3]`` image in ``[-1, 1]``."""
    pixels = to_uint8(image)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
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
    return json.dumps({k: _json_value(v) for k, v in row.items()}, sort_keys=True,
                      allow_nan=False) + "\n"


def _process_files(workdir: str, kind: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(workdir), f"{kind}.p[0-9]*.jsonl")))


def read_rows(path: str) -> tuple[list[dict], int]:
    """Parseable rows (JSON objects with a string ``id``) of a JSONL file and the count of others.

    Unparseable lines are what a kill during an append leaves behind; they are
    skipped (and counted) because the example they belonged to is redone.
    """
    rows, bad = [], 0
    if not os.path.exists(path):
        return rows, bad
    with open(path, "rb") as f:
        for line in f.read().split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _output_exists(workdir: str, row: Mapping[str, Any]) -> bool:
    outputs = [row.get("output")] + ([row["npz"]] if row.get("npz") else [])
    return all(isinstance(p, str) and os.path.isfile(os.path.join(workdir, p)) for p in outputs)


def _latest_by_id(rows: list[dict]) -> dict[str, dict]:
    """The last row of each id (a redone example's row supersedes older ones)."""
    return {row["id"]: row for row in rows}


def _all_rows(workdir: str, kind: str) -> tuple[list[dict], int]:
    """Rows of the consolidated file, then of every process file (later ones win)."""
    rows, bad = [], 0
    for path in [os.path.join(workdir, f"{kind}.jsonl")] + _process_files(workdir, kind):
        file_rows, file_bad = read_rows(path)
        rows += file_rows
        bad += file_bad
    return rows, bad


def completed_ids(workdir: str, *, retry_failed: bool = False) -> set[str]:
    """Ids that need no more work: finished (row and outputs present) or failed.

    Args:
        workdir: the job's output folder (all processes' files are read).
        retry_failed: leave failed ids out, so they are tried again.
    """
    rows, _ = _all_rows(workdir, MANIFEST)
    done = {row["id"] for row in rows if _output_exists(workdir, row)}
    if not retry_failed:
        done |= {row["id"] for row in _all_rows(workdir, FAILURES)[0]}
    return done


@dataclasses.dataclass(frozen=True)
class FinalizeSummary:
    """What ``finalize`` wrote and what it left out (and why)."""

    manifest_rows: int
    failure_rows: int
    ignored_lines: int
    missing_outputs: list[str]


def _write_jsonl(path: str, rows: list[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(_jsonl_line(row) for row in rows).encode())


def finalize(workdir: str) -> FinalizeSummary:
    """Writes ``manifest.jsonl`` and ``failures.jsonl``: one row per id, sorted by id.

    Call once after every process has closed its sink (e.g. on process 0
    after a barrier). Rows whose outputs are missing are left out and listed
    in the summary (a rerun redoes them); failure rows of ids that succeeded
    are dropped.
    """
    rows, bad_rows = _all_rows(workdir, MANIFEST)
    latest = _latest_by_id(rows)
    missing = sorted(i for i, row in latest.items() if not _output_exists(workdir, row))
    manifest = [latest[i] for i in sorted(set(latest) - set(missing))]
    failure_rows, bad_failures = _all_rows(workdir, FAILURES)
    succeeded = {row["id"] for row in manifest}
    failures = _latest_by_id([row for row in failure_rows if row["id"] not in succeeded])
    _write_jsonl(os.path.join(workdir, f"{MANIFEST}.jsonl"), manifest)
    failure_list = [failures[i] for i in sorted(failures)]
    _write_jsonl(os.path.join(workdir, f"{FAILURES}.jsonl"), failure_list)
    return FinalizeSummary(len(manifest), len(failures), bad_rows + bad_failures, missing)


def _remove_orphan_temps(workdir: str, process_index: int) -> None:
    """Deletes temporary files this process left behind when it was killed."""
    tag = _temp_tag(process_index)
    for folder, _, names in os.walk(workdir):
        for name in names:
            if name.startswith(".") and tag in name:
                os.remove(os.path.join(folder, name))


def _rewrite_clean(path: str) -> None:
    """Rewrites a process file without broken lines so that appends start on a fresh line."""
    if os.path.exists(path):
        rows, _ = read_rows(path)
        _write_jsonl(path, rows)


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
        save_npz: bool = False,
        num_threads: int = 2,
        max_pending: int = 8,
    ):
        """Opens (and cleans after a crash) this process's files in ``workdir``.

        Args:
            workdir: the job's output folder, shared by all processes.
            process_index: this process; its files carry the index.
            job_fields: fields added to every manifest row (sampler, n_steps,
                model checksum, ...); they must not depend on time or host.
            save_npz: also save the float32 output of each example.
            num_threads: writer threads.
            max_pending: queued write tasks before ``write*`` blocks.
        """
        self.workdir = workdir
        self.process_index = process_index
        self.save_npz = save_npz
        self.job_fields = dict(job_fields or {})
        _check_fields(self.job_fields)
        os.makedirs(workdir, exist_ok=True)
        _remove_orphan_temps(workdir, process_index)
        suffix = f".p{process_index:05d}.jsonl"
        self.manifest_path = os.path.join(workdir, MANIFEST + suffix)
        self.failures_path = os.path.join(workdir, FAILURES + suffix)
        for path in (self.manifest_path, self.failures_path):
            _rewrite_clean(path)
        self._files = {
            MANIFEST: open(self.manifest_path, "a", encoding="utf-8"),
            FAILURES: open(self.failures_path, "a", encoding="utf-8"),
        }
        self._file_lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._error_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads, "sink-writer")
        self._closed = False

    # --- public API ------------------------------------------------------------------------------

    def write(self, *, id: str, source: str, image: Any, t0: float, seed: int,
              fields: Mapping[str, Any] | None = None) -> None:
        """Queues one output ``image [H, W, C]`` in ``[-1, 1]`` (any array, e.g. a jax.Array)."""
        self._submit(self._write_example, id, source, image, t0, seed, self._fields(fields))

    def write_failure(self, *, id: str, source: str, reason: str,
                      fields: Mapping[str, Any] | None = None) -> None:
        """Queues a failure row ``{id, source, reason}`` (plus ``fields``)."""
        self._submit(self._write_failure, id, source, reason, self._fields(fields))

    def write_batch(self, batch: Mapping[str, Any], outputs: Any,
                    fields: Mapping[str, Any] | None = None) -> None:
        """Queues a batch from ``guide_inputs``: outputs for ok rows, failures for bad rows.

        Args:
            batch: a batch of the guide stream as numpy (``id``, ``source``,
                ``t0``, ``seed``, ``valid``, ``ok``, ``error``); padding rows
                (``valid`` False) are skipped.
            outputs: ``[B, H, W, C]`` outputs aligned with the batch; converted
                to numpy on the writer thread, so a jax.Array does not block
                the caller.
            fields: extra manifest fields for every row of the batch.
        """
        columns = {k: np.asarray(batch[k]) for k in ("id", "source", "t0", "seed", "valid", "ok",
                                                     "error")}
        self._submit(self._write_batch, columns, outputs, self._fields(fields))

    def close(self) -> None:
        """Waits for every queued write, closes the files, raises ``SinkError`` on any failure."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            for f in self._files.values():
                f.close()
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
            future = self._pool.submit(fn, *args)
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

    def _append(self, kind: str, row: Mapping[str, Any]) -> None:
        line = _jsonl_line(row)
        with self._file_lock:
            f = self._files[kind]
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _fields(self, fields: Mapping[str, Any] | None) -> dict[str, Any]:
        """Job fields plus per-call ``fields``, checked on the caller's thread."""
        merged = dict(self.job_fields, **(fields or {}))
        _check_fields(merged)
        return merged

    def _write_example(self, example_id: str, source: str, image: Any, t0: float, seed: int,
                       fields: dict[str, Any]) -> None:
        image = np.asarray(image, np.float32)
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(f"output of {example_id!r}: expected [H, W, 1 or 3], "
                             f"got shape {image.shape}")
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            self._write_failure(example_id, source, f"output: {bad} non-finite values", fields)
            return
        stem = output_stem(example_id)
        row = {"id": example_id, "source": source, "output": f"images/{stem}.png",
               "t0": np.float32(t0), "seed": int(seed)}
        atomic_write_bytes(os.path.join(self.workdir, row["output"]), png_bytes(image),
                           process_index=self.process_index)
        if self.save_npz:
            row["npz"] = f"arrays/{stem}.npz"
            buffer = io.BytesIO()
            np.savez(buffer, image=image)
            atomic_write_bytes(os.path.join(self.workdir, row["npz"]), buffer.getvalue(),
                               process_index=self.process_index)
        self._append(MANIFEST, {**fields, **row})

    def _write_failure(self, example_id: str, source: str, reason: str,
                       fields: dict[str, Any]) -> None:
        row = {"id": example_id, "source": source, "reason": reason}
        self._append(FAILURES, {**fields, **row})

    def _write_batch(self, columns: dict[str, np.ndarray], outputs: Any,
                     fields: dict[str, Any]) -> None:
        outputs = np.asarray(outputs)
        if outputs.shape[0] != len(columns["id"]):
            raise ValueError(f"outputs: {outputs.shape[0]} rows for a batch of "
                             f"{len(columns['id'])}")
        for i in np.flatnonzero(columns["valid"]):
            example_id, source = _text(columns["id"][i]), _text(columns["source"][i])
            if columns["ok"][i]:
                self._write_example(example_id, source, outputs[i], columns["t0"][i],
                                    columns["seed"][i], fields)
            else:
                self._write_failure(example_id, source, _text(columns["error"][i]), fields)


def _check_fields(fields: Mapping[str, Any]) -> None:
    clash = sorted(set(fields) & set(RESERVED_FIELDS))
    if clash:
        raise ValueError(f"fields: {clash} are written by the sink itself")
