"""The ``manifest`` source (``.jsonl``, ``.csv``): rows parsed and checked in a stream, as columns.

Why a stream: a million-row manifest is listed on every host before any work, so it
must cost seconds and tens of MB, not a dict and a row object per line (~1 KB and
~20 µs each). Lines are read in chunks of 1 MB; a chunk is parsed in one call and
its fields are checked in bulk (the fast path); a row the fast path cannot vouch for
takes the per-row path (:func:`_manifest_row`), which names every problem. Either way
a row ends in the catalog's columns, never in a list of Python objects.

One line never stops the job: invalid UTF-8, invalid JSON, nesting too deep for the
parser, integers past Python's digit limit and lone surrogates each become one
failure row for that line (named ``<manifest>:<line>`` when no id can be trusted).
"""

from __future__ import annotations

import csv
import ctypes
import io
import itertools
import json
import math
import operator
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from sdedit_jax.data.guide_inputs import micro
from sdedit_jax.data.guide_inputs.catalog import (
    SEED_RANGE,
    Catalog,
    Source,
    _columns_catalog,
    _file_problem,
    _HugeInt,
    _id_bytes,
    _int_or_huge,
    _objects,
    _parse_seed,
    _parse_t0,
    _Row,
    _shown,
    _utf8,
)
from sdedit_jax.data.guide_inputs.text import FIELDS as TEXT_FIELDS
from sdedit_jax.data.guide_inputs.text import parse_guidance
from sdedit_jax.util import files

NAME = "manifest"
# The text fields (prompt, negative_prompt, guidance_scale): see guide_inputs.text.
# The SDXL micro-conditioning fields (original_size, ...): see guide_inputs.micro.
MANIFEST_FIELDS = ("path", "mask", "t0", "seed", "id", *TEXT_FIELDS, *micro.FIELDS)

_CHUNK_BYTES = 1 << 20  # lines read and parsed together (~20,000 rows)
_CSV_CHUNK_ROWS = 1 << 15
_FIELDS = frozenset(MANIFEST_FIELDS)
_NEWLINES = re.compile(r"\r\n|\r|\n")


class _RepeatedKey(ValueError):
    """A JSON object repeats a key (``json`` would silently keep the last value)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    fields = dict(pairs)
    if len(fields) != len(pairs):  # a set, not a count per key: lines may hold many keys
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _RepeatedKey(_shown(repeated))
    return fields


def _json_line(line: str) -> tuple[dict | None, str]:
    """``(fields, "")`` of one JSONL line, or ``(None, why it is no row)``."""
    try:
        fields = json.loads(line, object_pairs_hook=_unique_keys, parse_int=_int_or_huge)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e})"
    except _RepeatedKey as e:
        return None, f"field {e} appears more than once"
    except RecursionError:
        return None, "invalid JSON (nested too deeply to parse)"
    if not isinstance(fields, dict):
        return None, "expected a JSON object"
    return {k: v for k, v in fields.items() if v is not None}, ""


def _json_chunk(lines: list[str]) -> list[dict] | None:
    """All ``lines`` parsed in one call, or None unless each is provably one object.

    Joined as one JSON array the lines parse about 3x faster than one by one. The
    result is trusted only if it cannot differ from per-line parsing: every line
    starts with the only ``{`` it holds and every value is an object (so each ``{``
    opens a row: no row nests an object or spans lines), there are as many values
    as lines (so each line is one row), and the text has exactly as many ``:`` as
    the rows have keys (so no key repeats).
    """
    joined = "\n".join(lines)  # lines hold no newline, so "\n{" marks a line's start
    if not (
        joined.startswith("{")
        and joined.count("{") == len(lines)
        and joined.count("\n{") == len(lines) - 1
    ):
        return None
    text = "[" + joined.replace("\n", ",") + "]"
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if len(values) != len(lines) or set(map(type, values)) != {dict}:
        return None
    if text.count(":") != sum(map(len, values)):
        return None
    if "null" in text:  # a null field counts as absent
        values = [{k: v for k, v in f.items() if v is not None} for f in values]
    return values


# A chunk of manifest rows: line numbers, fields (None: no row could be read) and,
# unless every row was read, why not ("" for rows that were).
_Records = tuple[list[int], list[dict | None], list[str] | None]


def _jsonl_records(stream) -> Iterator[_Records]:
    """The non-blank lines of a JSONL manifest, in chunks."""
    number = 0
    while True:
        raw = stream.readlines(_CHUNK_BYTES)
        if not raw:
            return
        if number == 0 and raw[0].startswith(b"\xef\xbb\xbf"):  # a BOM (editors on Windows)
            raw[0] = raw[0][3:]
        try:
            text = b"".join(raw).decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            lines = _NEWLINES.split(text) if "\r" in text else text.split("\n")
            if lines[-1] == "":
                lines.pop()
            parsed = _json_chunk(lines) if all(lines) else None
            if parsed is not None:
                yield list(range(number + 1, number + 1 + len(lines))), parsed, None
                number += len(lines)
                continue
            pieces: list[str | UnicodeDecodeError] = list(lines)
        else:
            pieces = []
            for line in raw:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    pieces.append(e)
                    continue
                text = text.removesuffix("\n").removesuffix("\r")  # its line ending
                pieces += _NEWLINES.split(text) if "\r" in text else [text]
        numbers, fields, errors = [], [], []
        for line in pieces:
            number += 1
            if isinstance(line, UnicodeDecodeError):
                row, error = None, f"not UTF-8 text (byte {line.start}: {line.reason})"
            elif not line.strip():
                continue
            else:
                row, error = _json_line(line)
            numbers.append(number)
            fields.append(row)
            errors.append(error)
        yield numbers, fields, errors


def _csv_records(stream) -> Iterator[_Records]:
    """The rows of a CSV manifest, in chunks."""
    # -sig: spreadsheet CSVs carry a BOM; bytes that are not UTF-8 fail only their row.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text, restkey="\0extra")
    header = reader.fieldnames or []
    repeated = sorted({name for name in header if header.count(name) > 1})
    while True:
        numbers, fields, errors = [], [], []
        for row in itertools.islice(reader, _CSV_CHUNK_ROWS):
            numbers.append(reader.line_num)
            error = ""
            if repeated:
                # DictReader would silently keep the last of the repeated columns.
                error = f"the header repeats column(s) {repeated}"
            elif "\0extra" in row:
                error = "more values than header columns"
            elif not all(_utf8(v) for v in row.values() if isinstance(v, str)):
                error = "not UTF-8 text"
            fields.append(None if error else {k: v for k, v in row.items() if v not in (None, "")})
            errors.append(error)
        if not numbers:
            return
        yield numbers, fields, errors


def _manifest_row(number: int, fields: dict | None, error: str, manifest: str, config: Any) -> _Row:
    """One row, every problem named: the per-row path (rows the fast path does not vouch for)."""
    base = files.dirname(manifest)
    where = f"manifest ({manifest}) line {number}"
    fields = fields or {}
    raw_path = fields.get("path")
    path = files.join(base, raw_path) if isinstance(raw_path, str) and raw_path else manifest
    row_id = fields.get("id", raw_path)
    if not (isinstance(row_id, str) and row_id):
        row_id = f"{os.path.basename(manifest)}:{number}"
    problems, values = _field_problems(fields, config) if not error else ([error], {})
    if problems:
        return _Row(
            id=row_id,
            source=path,
            t0=config.t0,
            seed=config.seed,
            guide_path=path,
            error=f"{where}: " + "; ".join(problems),
        )
    mask = fields.get("mask")
    return _Row(
        id=row_id,
        source=path,
        t0=values.get("t0", config.t0),
        seed=values.get("seed", config.seed),
        guide_path=path,
        mask_path=files.join(base, mask) if mask else "",
        t0_given="t0" in values,
        prompt=fields.get("prompt"),
        negative_prompt=fields.get("negative_prompt"),
        guidance_scale=values.get("guidance_scale"),
        micro={f: values[f] for f in micro.FIELDS if f in values} or None,
    )


def _field_problems(fields: dict, config: Any) -> tuple[list[str], dict]:
    """Every problem of a decoded row's fields, and its parsed ``t0``/``seed`` values."""
    problems = [
        f"unknown field {_shown(k)} (known: {', '.join(MANIFEST_FIELDS)})"
        for k in sorted(fields, key=str)
        if k not in MANIFEST_FIELDS
    ]
    raw_path = fields.get("path")
    if not (isinstance(raw_path, str) and raw_path):
        problems.append(f"path: expected a non-empty string, got {_shown(raw_path)}")
    for name in ("mask", "id"):
        if name in fields and not (isinstance(fields[name], str) and fields[name]):
            problems.append(f"{name}: expected a non-empty string, got {_shown(fields[name])}")
    for name in ("prompt", "negative_prompt"):  # "" is a valid (empty) prompt
        if name in fields and not isinstance(fields[name], str):
            problems.append(f"{name}: expected a string, got {_shown(fields[name])}")
    values = {}
    parsers = (
        ("t0", lambda v: _parse_t0(v, config)),
        ("seed", _parse_seed),
        ("guidance_scale", _parse_guidance),
        *((name, lambda v, name=name: _parse_micro(name, v)) for name in micro.FIELDS),
    )
    for name, parse in parsers:
        if name in fields:
            try:
                values[name] = parse(fields[name])
            except ValueError as e:
                problems.append(f"{name}: {e}")
    return problems, values


def _parse_micro(name: str, value: Any) -> Any:
    if isinstance(value, _HugeInt):
        raise ValueError(f"expected a number, got {value!r}")
    return micro.parse(name, value)


def _parse_guidance(value: Any) -> float:
    if isinstance(value, _HugeInt):
        raise ValueError(f"expected a finite number >= 0, got {value!r}")
    return parse_guidance(value)


class _ColumnParts:
    """Per-chunk numpy columns of manifest rows, concatenated once at the end.

    A row's ``source`` is its guide path: one string object serves both columns.
    """

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in _ROW_FIELDS}
        # Micro-conditioning columns only where some row names the field (no cost otherwise).
        self.micro: dict[str, list[tuple[int, np.ndarray | None]]] = {
            name: [] for name in micro.FIELDS
        }

    def add(
        self, ids, sources, guides, masks, t0, seed, t0_given, text, micro_values, errors=None
    ) -> None:
        """Appends rows given as one list per field (``errors``: None when all are good;
        ``text``: the prompts, negative prompts and guidance scales, None where not given;
        ``micro_values``: field -> values of the micro-conditioning fields the chunk names)."""
        self.parts["id"].append(_id_bytes(ids))
        for name in micro.FIELDS:
            values = micro_values.get(name)
            self.micro[name].append(
                (len(ids), None if values is None else micro.column(name, values))
            )
        prompts, negatives, scales = text
        for name, values in (
            ("source", sources),
            ("guide_path", guides),
            ("mask_path", masks),
            ("prompt", prompts),
            ("negative_prompt", negatives),
        ):
            self.parts[name].append(_objects(values))
        self.parts["guidance_scale"].append(
            np.array([np.nan if s is None else s for s in scales], np.float32).reshape(-1)
        )
        self.parts["error"].append(
            np.full(len(ids), "", object) if errors is None else _objects(errors)
        )
        self.parts["t0"].append(np.asarray(t0, np.float32))
        self.parts["seed"].append(np.asarray(seed, np.int64))
        self.parts["t0_given"].append(np.asarray(t0_given, bool))

    def columns(self) -> dict[str, np.ndarray]:
        """The columns; the parts are released one by one (a column is never held twice)."""
        columns = {name: np.concatenate(self.parts.pop(name)) for name in _ROW_FIELDS}
        for name, chunks in self.micro.items():
            if any(values is not None for _, values in chunks):
                columns[name] = np.concatenate(
                    [micro.empty_column(name, n) if v is None else v for n, v in chunks]
                )
        return columns


_ROW_FIELDS = (
    "id",
    "source",
    "guide_path",
    "mask_path",
    "t0",
    "seed",
    "t0_given",
    "error",
    "prompt",
    "negative_prompt",
    "guidance_scale",
)


def _add_chunk(parts: _ColumnParts, records: _Records, manifest: str, config: Any) -> None:
    """Checks a chunk of rows in bulk; the rows it cannot vouch for take the per-row path.

    Rows keep their line order (ties of the canonical sort, hence which of two rows
    with one id keeps it, depend on it).
    """
    numbers, fields, errors = records
    unread = errors is not None and any(errors)
    if unread:
        fields = [{} if e else f for f, e in zip(fields, errors, strict=True)]
    keys = set().union(*fields)
    paths = _values(fields, "path")
    ids = _values(fields, "id") if "id" in keys else paths
    if "id" in keys and None in ids:
        ids = [p if i is None else i for p, i in zip(paths, ids, strict=True)]
    if {type(p) for p in paths} | {type(i) for i in ids} == {str} and not (
        "" in paths or "" in ids
    ):
        good = [True] * len(fields)
    else:
        good = [
            type(p) is str and p != "" and type(i) is str and i != ""
            for p, i in zip(paths, ids, strict=True)
        ]
    if not keys <= _FIELDS:
        good = [g and f.keys() <= _FIELDS for g, f in zip(good, fields, strict=True)]
    masks = [""] * len(fields)
    if "mask" in keys:
        masks = [f.get("mask", "") for f in fields]
        good = [
            g and type(m) is str and (m != "" or "mask" not in f)
            for g, m, f in zip(good, masks, fields, strict=True)
        ]
    t0, given = [config.t0] * len(fields), [False] * len(fields)
    if "t0" in keys:
        low, high = config.time_domain
        values = [f.get("t0") for f in fields]
        given = [v is not None for v in values]
        good = [
            g and (v is None or (type(v) in (int, float) and low < v <= high))
            for g, v in zip(good, values, strict=True)
        ]
        t0 = [
            float(v) if v is not None and g else config.t0
            for v, g in zip(values, good, strict=True)
        ]
    seed = [config.seed] * len(fields)
    if "seed" in keys:
        values = [f.get("seed") for f in fields]
        good = [
            g and (v is None or (type(v) is int and SEED_RANGE[0] <= v < SEED_RANGE[1]))
            for g, v in zip(good, values, strict=True)
        ]
        seed = [
            v if v is not None and g else config.seed for v, g in zip(values, good, strict=True)
        ]
    text = [[None] * len(fields) for _ in range(3)]
    for k, name in enumerate(("prompt", "negative_prompt")):
        if name in keys:
            text[k] = [f.get(name) for f in fields]
            good = [g and (v is None or type(v) is str) for g, v in zip(good, text[k], strict=True)]
    if "guidance_scale" in keys:
        text[2] = [f.get("guidance_scale") for f in fields]
        good = [
            g and (v is None or (type(v) in (int, float) and 0 <= v < math.inf))
            for g, v in zip(good, text[2], strict=True)
        ]
    micro_named = keys & set(micro.FIELDS)
    if micro_named:  # rare: the per-row path parses and names them
        good = [g and not (f.keys() & micro_named) for g, f in zip(good, fields, strict=True)]
    if unread:
        good = [g and not e for g, e in zip(good, errors, strict=True)]
    slow = {
        i: _manifest_row(numbers[i], records[1][i], errors[i] if unread else "", manifest, config)
        for i, g in enumerate(good)
        if not g
    }
    if slow:  # their values from the per-row path, in place
        paths = ["" if i in slow else p for i, p in enumerate(paths)]
        masks = ["" if i in slow else m for i, m in enumerate(masks)]
    base = files.dirname(manifest)
    guides, masks = _joined(base, paths), _joined(base, masks)
    sources, ids, row_errors = guides, ids, None
    if slow:
        sources, ids, row_errors = list(guides), list(ids), [""] * len(ids)
        for i, row in slow.items():
            ids[i], sources[i], guides[i], masks[i] = (
                row.id,
                row.source,
                row.guide_path,
                row.mask_path,
            )
            t0[i], seed[i], given[i], row_errors[i] = row.t0, row.seed, row.t0_given, row.error
            text[0][i], text[1][i] = row.prompt, row.negative_prompt
            text[2][i] = row.guidance_scale
    micro_values = {name: [None] * len(fields) for name in micro_named}
    for i, row in slow.items():
        for name, value in (row.micro or {}).items():
            micro_values[name][i] = value
    parts.add(ids, sources, guides, masks, t0, seed, given, text, micro_values, row_errors)


def _values(fields: list[dict], key: str) -> list:
    """``field.get(key)`` of every row (at C speed when every row has the key)."""
    try:
        return list(map(operator.itemgetter(key), fields))
    except KeyError:
        return [f.get(key) for f in fields]


def _joined(base: str, paths: list[str]) -> list[str]:
    """``files.join(base, path)`` of each path; rows naming the same file share one string."""
    prefix = base if base.endswith("/") else base + "/"
    cache = {"": ""}
    return [
        cache[p]
        if p in cache
        else cache.setdefault(
            p, files.join(base, p) if "://" in p or "://" in base else _local_join(prefix, p)
        )
        for p in paths
    ]


def _local_join(prefix: str, path: str) -> str:
    """``os.path.join`` of a folder (given as ``prefix``, ending in ``/``) and ``path``."""
    return path if path.startswith("/") else prefix + path


def manifest_catalog(config: Any) -> Catalog:
    """Every row of a ``.jsonl`` / ``.csv`` manifest, in canonical (sorted id) order."""
    manifest = files.abspath(config.path)
    if files.is_local(manifest) and os.path.exists(manifest):
        problem = _file_problem(manifest)  # a FIFO would block the reader forever
        if problem:
            raise ValueError(f"path: manifest {config.path!r} is {problem}")
    if not files.isfile(manifest):
        raise ValueError(f"path: manifest {config.path!r} does not exist")
    if not manifest.lower().endswith((".jsonl", ".csv")):
        raise ValueError(f"path: manifest {config.path!r} must end in .jsonl or .csv")
    parts = _ColumnParts()
    reader = _csv_records if manifest.lower().endswith(".csv") else _jsonl_records
    with files.open_file(manifest, "rb") as stream:
        try:
            for records in reader(stream):
                _add_chunk(parts, records, manifest, config)
        except csv.Error as e:
            raise ValueError(
                f"path: manifest {config.path!r} is not a readable CSV ({e})"
            ) from None
    if not sum(map(len, parts.parts["id"])):
        raise ValueError(f"path: manifest {config.path!r} has no rows")
    columns = parts.columns()
    _release_freed_memory()
    return _columns_catalog(columns, sort=True)


def _release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Why: glibc keeps the pages of the per-chunk arrays after they are concatenated,
    and the id column is built after them, so without this a million-row manifest
    peaks about 60 MB higher (measured: 213 vs 155 MB).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


SOURCE = Source(NAME, manifest_catalog)
