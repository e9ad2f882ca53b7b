"""Job records: manifest and failure rows (JSONL), the completed-id index, ``finalize``.

What the sink (:mod:`sdedit_jax.jobs.sinks`) publishes, read back: the layout and the
crash-safety rules are in that module's docstring. Here: reading rows as a stream
(:func:`read_rows`), the compact index of finished ids a resume skips
(:class:`CompletedIds`, :func:`completed_index`), the per-row input digests rows
record (:class:`DigestTable`), and :func:`finalize`, which merges every process's
records into ``manifest.jsonl`` and ``failures.jsonl``.

Bounded bookkeeping: resume reads the records as a stream and keeps only an
8-byte hash per finished id (:class:`CompletedIds`), not the rows or id strings.

Failure policy: a failed example (bad input or non-finite output) is recorded
once and, being deterministic, is not retried on resume; pass
``retry_failed=True`` to :func:`completed_ids` to retry failures (e.g. after
fixing the files). ``finalize`` drops failure rows of ids that later succeeded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from sdedit_jax.data.guide_inputs import micro
from sdedit_jax.util import files

MANIFEST = "manifest"
FAILURES = "failures"
OUTPUT_KEYS = ("output", "npz")


def process_tag(process_index: int) -> str:
    """``p00003``: in the names of a process's records and temporary files."""
    return f"p{process_index:05d}"


def usable_cores() -> int:
    """Threads for per-file work (checking outputs, writing them): one per CPU core this
    process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _json_value(value: Any) -> Any:
    """JSON-ready copy; float32 values keep the 7 digits that round-trip them."""
    if isinstance(value, (np.floating, float)) and np.asarray(value).dtype == np.float32:
        return float(f"{float(value):.7g}")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def jsonl_line(row: Mapping[str, Any]) -> str:
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
                concurrent.futures.ThreadPoolExecutor(usable_cores(), "sink-verify")
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
        files.publish_chunks(path, (latest[i][1] for i in sorted(latest)), tag=process_tag(0))
    for path in manifest_files[1:] + failure_files[1:]:
        try:
            files.remove(path)
        except FileNotFoundError:
            pass
    return FinalizeSummary(len(manifest), len(failures), bad_rows + bad_failures, missing, changed)


# --- per-row input digests ------------------------------------------------------------------------
# Why: the job fingerprint (:mod:`sdedit_jax.jobs.fingerprint`) covers everything shared
# by all rows, but a row's own inputs (its guide path, mask path, t0 and seed, the
# text of models that take prompts, from a manifest, folder, caption or record, and an
# SDXL row's own micro-conditioning) can
# change between runs under the same id; resume would then skip the id as done and
# the workdir would hold an output of other inputs. Each
# manifest row records ``inputs``, a 64-bit digest of those fields (16 hex digits); on
# resume, a finished id whose digest differs from its inputs now becomes one failure
# row naming the changed field (:func:`sdedit_jax.jobs.plan.changed_inputs`; the
# earlier output and its row stay). Rows of older versions have no digest: unknown,
# kept as done. Cost: one vectorised hash over the catalog per sub-job (about 2 s per
# million rows on a slow core) and 16 bytes per row in memory.


def digests(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """The input digest (uint64, never 0) of every catalog row.

    The source is part of the guide: record sources have no guide path. Rows with
    text (a model that takes prompts) add their prompt, negative prompt and
    guidance scale; rows without keep the digest of earlier versions. So do rows whose
    SDXL micro-conditioning is the job's (covered by the workdir's fingerprint); rows
    with their own add its values (:func:`micro.digest_part`).
    """
    keys = [
        f"{source}\0{guide}\0{mask}\0{float(t0)!r}\0{int(seed)}"
        for source, guide, mask, t0, seed in zip(
            columns["source"].tolist(),
            columns["guide_path"].tolist(),
            columns["mask_path"].tolist(),
            np.asarray(columns["t0"], np.float32).tolist(),
            columns["seed"].tolist(),
            strict=True,
        )
    ]
    if "prompt" in columns:
        # Lengths first: no prompt ending in the separator collides with another split.
        keys = [
            f"{key}\0{len(prompt)}:{prompt}\0{len(negative)}:{negative}\0{float(scale)!r}"
            for key, prompt, negative, scale in zip(
                keys,
                columns["prompt"].tolist(),
                columns["negative_prompt"].tolist(),
                np.asarray(columns["guidance_scale"], np.float32).tolist(),
                strict=True,
            )
        ]
    if micro.OWN in columns:
        for i in np.flatnonzero(columns[micro.OWN]):
            keys[i] = f"{keys[i]}\0{micro.digest_part(columns, int(i))}"
    values = id_hashes(keys) if keys else np.zeros(0, np.uint64)
    return np.where(values == 0, np.uint64(1), values)


class DigestTable:
    """Input digests by id (sorted id hashes beside their digests): the sink's lookup."""

    def __init__(self, columns: Mapping[str, np.ndarray]):
        self.values = digests(columns)
        self._index = CompletedIds(id_hashes(columns["id"]), self.values)

    def lookup(self, ids) -> np.ndarray:
        """The digest of every id (0 for ids not in the table)."""
        return self._index.digests(ids)
