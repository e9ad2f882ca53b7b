"""The catalog: every example of a source in canonical order, with its id, t0, seed, error.

Listing reads no pixels (only folder entries, manifest rows, record headers), so a
job can count, shard and skip completed examples before decoding anything.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import stat
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from sdedit_jax import files
from sdedit_jax.data import names
from sdedit_jax.data.guide_inputs.config import (
    GUIDE_EXTENSIONS,
    MANIFEST_FIELDS,
    MASK_EXTENSIONS,
    SEED_RANGE,
    GuideInputConfig,
    _as_config,
)
from sdedit_jax.data.records import record_fields


def _plain(fn: Callable) -> Callable:
    """Marks a tf.data function as plain graph code: AutoGraph would otherwise convert
    it and leave ``__autograph_generated_file*.py`` in the temp folder (forever, after a kill)."""
    return tf.autograph.experimental.do_not_convert(fn)


@dataclasses.dataclass(frozen=True)
class _Row:
    id: str
    source: str
    t0: float
    seed: int
    guide_path: str = ""
    mask_path: str = ""
    error: str = ""
    t0_given: bool = False  # the input names its own t0 (see T0_ROWS)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Metadata of all examples of a source in canonical order (no pixels are read).

    Attributes:
        columns: equal-length numpy arrays ``id`` (str), ``source``,
            ``guide_path``, ``mask_path`` and ``error`` (object arrays of str;
            ``error`` non-empty for examples already known to be bad), ``t0``
            (float32), ``t0_given`` (bool) and ``seed`` (int64).
        payload: for record sources, a function returning a dataset aligned
            row for row with ``columns`` that yields ``record`` (serialized
            ``tf.train.Example``), ``guide_bytes`` and ``mask_bytes``.
    """

    columns: dict[str, np.ndarray]
    payload: Callable[[], tf.data.Dataset] | None = None

    def __len__(self) -> int:
        return len(self.columns["id"])

    @property
    def ids(self) -> list[str]:
        return self.columns["id"].tolist()


def _catalog(rows: list[_Row], payload=None) -> Catalog:
    """Column arrays of ``rows``; repeated ids fail so that no output is overwritten."""
    first_source: dict[str, str] = {}
    repeats: dict[str, int] = {}
    unique = []
    for row in rows:
        if row.id not in first_source:
            first_source[row.id] = row.source
            unique.append(row)
            continue
        repeats[row.id] = repeats.get(row.id, 0) + 1
        reason = (
            f"id ({row.source}): {row.id!r} is already used by {first_source[row.id]}; "
            "give every example a distinct id"
        )
        unique.append(
            dataclasses.replace(
                row, id=f"{row.id}#duplicate{repeats[row.id]}", error=row.error or reason
            )
        )
    unique = [_encodable(row) for row in unique]
    clashes = names.find_clashes(row.id for row in unique)
    unique = [
        row
        if row.id not in clashes
        else dataclasses.replace(
            row,
            error=row.error
            or (
                f"id ({row.source}): output name {names.output_name(row.id)!r} "
                f"clashes with that of id {clashes[row.id]!r}; give the examples other ids"
            ),
        )
        for row in unique
    ]
    # Ids as a numpy str array (hashed and compared in bulk); the other text columns as
    # object arrays: a fixed-width column costs 4 bytes x the longest value per row, so
    # one long error message would cost gigabytes over a million rows.
    columns = {"id": np.array([row.id for row in unique], dtype=str)}
    for name in ("source", "guide_path", "mask_path", "error"):
        column = np.empty(len(unique), object)
        column[:] = [getattr(row, name) for row in unique]
        columns[name] = column
    columns["t0"] = np.array([row.t0 for row in unique], np.float32)
    columns["t0_given"] = np.array([row.t0_given for row in unique], bool)
    columns["seed"] = np.array([row.seed for row in unique], np.int64)
    return Catalog(columns, payload)


def _printable(text: str) -> str:
    """``text`` with bytes that are not UTF-8 (file names) shown as ``\\xNN``.

    A lone surrogate that is no escaped byte (``"\\ud800"`` in a JSON manifest) is
    shown as ``\\ud800``.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(row: _Row) -> _Row:
    """The row, or a failed row with printable text if a field is not valid UTF-8.

    Such text (a file name in another encoding, a lone surrogate in a JSON
    manifest) cannot enter the tf.data pipeline or a JSON manifest.
    """
    fields = ("id", "source", "guide_path", "mask_path", "error")
    if all(getattr(row, f).isascii() for f in fields):  # the common case, checked fast
        return row
    bad = [f for f in fields if _printable(getattr(row, f)) != getattr(row, f)]
    if not bad:
        return row
    shown = {f: _printable(getattr(row, f)) for f in ("id", "source")}
    field = {"id": "id", "mask_path": "mask"}.get(bad[0], "guide")
    return dataclasses.replace(
        row,
        **shown,
        guide_path="",
        mask_path="",
        error=(f"{field} ({shown['source']}): name is not valid UTF-8; rename the file"),
    )


def _file_problem(path: str) -> str:
    """Why the (non-folder) entry ``path`` cannot be read as an input file, or ``""``."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file not found"
    except OSError as e:
        return f"cannot read ({e.strerror})"
    if stat.S_ISREG(mode):
        return ""
    kinds = {
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "not a file")
    return f"{kind}, not a regular file"


def _walk_files(root: str, skip: str = "") -> list[tuple[str, str]]:
    """Sorted ``(POSIX path relative to root, problem)`` of non-hidden entries, skipping ``skip``.

    Symbolic links to folders are followed (their files are inputs like any
    other), except a link back to a folder above it, which is listed with its
    problem rather than walked forever. Entries that are not regular files
    (FIFOs, sockets, devices, broken links) are listed with their problem, so
    they become failure rows instead of hanging the reader or vanishing.
    """
    if not files.is_local(root):
        return _walk_store(root, skip)
    found: list[tuple[str, str]] = []

    def visit(folder: str, rel_folder: str, ancestors: frozenset[str]) -> None:
        try:
            entries = sorted(os.listdir(folder))
        except OSError as e:
            found.append((rel_folder or ".", f"cannot list folder ({e.strerror})"))
            return
        for name in entries:
            path, rel = os.path.join(folder, name), f"{rel_folder}/{name}" if rel_folder else name
            if name.startswith(".") or path == skip:
                continue
            if os.path.isdir(path):
                real = os.path.realpath(path)
                if real in ancestors:
                    found.append((rel, f"symbolic link to {real}, a folder above it; not followed"))
                else:
                    visit(path, rel, ancestors | {real})
                continue
            found.append((rel, _file_problem(path)))

    visit(root, "", frozenset({os.path.realpath(root)}))
    return sorted(found)


def _walk_store(root: str, skip: str) -> list[tuple[str, str]]:
    """``_walk_files`` on an object store (``gs://``, ``ram://``): objects are regular files."""
    found = []
    for folder, subfolders, entries in files.walk(root):
        subfolders[:] = [
            f for f in subfolders if not f.startswith(".") and files.join(folder, f) != skip
        ]
        rel_folder = "" if folder == root else files.relpath(folder, root)
        found += [
            (f"{rel_folder}/{n}" if rel_folder else n, "") for n in entries if not n.startswith(".")
        ]
    return sorted(found)


def _folder_catalog(config: GuideInputConfig) -> Catalog:
    root = files.abspath(config.path)
    if not files.isdir(root):
        raise ValueError(f"path: guide folder {config.path!r} does not exist")
    mask_root = ""
    if config.mask_dir:
        mask_root = files.join(root, config.mask_dir)
        mask_root = os.path.normpath(mask_root) if files.is_local(root) else mask_root
    with_masks = bool(mask_root) and files.isdir(mask_root)
    masks_by_stem: dict[str, list[str]] = {}
    rows, guide_stems = [], set()

    def mask_failure(rel: str, reason: str) -> _Row:
        path = files.join(mask_root, rel)
        return _Row(
            id=f"{config.mask_dir}/{rel}",
            source=path,
            t0=config.t0,
            seed=config.seed,
            error=f"mask ({path}): {reason}",
        )

    for rel, problem in _walk_files(mask_root) if with_masks else []:
        if problem:
            rows.append(mask_failure(rel, problem))
        else:
            masks_by_stem.setdefault(os.path.splitext(rel)[0], []).append(rel)
    for rel, problem in _walk_files(root, skip=mask_root):
        path = files.join(root, rel)
        row = _Row(id=rel, source=path, t0=config.t0, seed=config.seed, guide_path=path)
        if problem:
            rows.append(dataclasses.replace(row, error=f"guide ({path}): {problem}"))
            continue
        stem, ext = os.path.splitext(rel)
        if ext.lower() not in GUIDE_EXTENSIONS:
            rows.append(
                dataclasses.replace(
                    row,
                    error=f"guide ({path}): unsupported extension {ext!r}; expected one of "
                    f"{GUIDE_EXTENSIONS}",
                )
            )
            continue
        guide_stems.add(stem)
        if with_masks:
            row = _pair_mask(row, stem, masks_by_stem.get(stem, []), mask_root)
        rows.append(row)
    for stem, mask_files in sorted(masks_by_stem.items()):
        if stem not in guide_stems:
            rows.extend(mask_failure(rel, f"no guide image named {stem}.*") for rel in mask_files)
    if not rows:
        raise ValueError(f"path: guide folder {config.path!r} holds no files")
    return _catalog(sorted(rows, key=lambda r: r.id))


def _pair_mask(row: _Row, stem: str, candidates: list[str], mask_root: str) -> _Row:
    """Attaches the guide's mask, or an error naming the expected mask files."""
    usable = [c for c in candidates if os.path.splitext(c)[1].lower() in MASK_EXTENSIONS]
    if len(usable) == 1 and len(candidates) == 1:
        return dataclasses.replace(row, mask_path=files.join(mask_root, usable[0]))
    expected = files.join(mask_root, stem) + "{" + ",".join(MASK_EXTENSIONS) + "}"
    if not candidates:
        problem = "file not found (the mask folder exists, so every guide needs a mask)"
    else:
        problem = f"need exactly one such file, found {sorted(candidates)}"
    return dataclasses.replace(row, error=f"mask ({expected}): {problem}")


def _parse_t0(value: Any, config: GuideInputConfig) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        t0 = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not config.in_time_domain(t0):
        raise ValueError(f"{value!r} is not in {config.time_domain_text()}")
    return t0


def _parse_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        seed = int(value)
    except ValueError:
        raise ValueError(f"expected an integer, got {value!r}") from None
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"{value!r} is not in [0, 2^31)")
    return seed


class _RepeatedKey(ValueError):
    """A JSON object repeats a key (``json`` would silently keep the last value)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise _RepeatedKey(repr(repeated))
    return dict(pairs)


def _manifest_records(path: str) -> list[tuple[int, dict | None, str]]:
    """``(line number, fields or None, parse error)`` for every non-blank manifest row."""
    # -sig: spreadsheet CSVs carry a BOM
    with io.TextIOWrapper(files.open_file(path, "rb"), encoding="utf-8-sig", newline="") as f:
        if path.lower().endswith(".csv"):
            reader = csv.DictReader(f, restkey="\0extra")
            header = reader.fieldnames or []
            repeated = sorted({name for name in header if header.count(name) > 1})
            records = []
            for fields in reader:
                if repeated:
                    # DictReader would silently keep the last of the repeated columns.
                    records.append(
                        (reader.line_num, None, f"the header repeats column(s) {repeated}")
                    )
                    continue
                if "\0extra" in fields:
                    records.append((reader.line_num, None, "more values than header columns"))
                    continue
                present = {k: v for k, v in fields.items() if v not in (None, "")}
                records.append((reader.line_num, present, ""))
            return records
        records = []
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                records.append((number, None, f"invalid JSON ({e})"))
                continue
            except _RepeatedKey as e:
                records.append((number, None, f"field {e} appears more than once"))
                continue
            if not isinstance(fields, dict):
                records.append((number, None, "expected a JSON object"))
                continue
            records.append((number, {k: v for k, v in fields.items() if v is not None}, ""))
        return records


def _manifest_row(
    number: int, fields: dict | None, error: str, manifest: str, config: GuideInputConfig
) -> _Row:
    base = files.dirname(manifest)
    where = f"manifest ({manifest}) line {number}"
    fields = fields or {}
    raw_path = fields.get("path")
    path = files.join(base, raw_path) if isinstance(raw_path, str) and raw_path else manifest
    row_id = fields.get("id", raw_path)
    if not (isinstance(row_id, str) and row_id):
        row_id = f"{os.path.basename(manifest)}:{number}"
    row = _Row(id=row_id, source=path, t0=config.t0, seed=config.seed, guide_path=path)
    if error:
        return dataclasses.replace(row, error=f"{where}: {error}")
    problems = [
        f"unknown field {k!r} (known: {', '.join(MANIFEST_FIELDS)})"
        for k in sorted(fields, key=str)
        if k not in MANIFEST_FIELDS
    ]
    if not (isinstance(raw_path, str) and raw_path):
        problems.append(f"path: expected a non-empty string, got {raw_path!r}")
    for name in ("mask", "id"):
        if name in fields and not (isinstance(fields[name], str) and fields[name]):
            problems.append(f"{name}: expected a non-empty string, got {fields[name]!r}")
    values = {}
    for name, parse in (("t0", lambda v: _parse_t0(v, config)), ("seed", _parse_seed)):
        if name in fields:
            try:
                values[name] = parse(fields[name])
            except ValueError as e:
                problems.append(f"{name}: {e}")
    if problems:
        return dataclasses.replace(row, error=f"{where}: " + "; ".join(problems))
    mask = fields.get("mask")
    # Built once (not via dataclasses.replace): this runs for every row of a manifest.
    return _Row(
        id=row_id,
        source=path,
        t0=values.get("t0", config.t0),
        seed=values.get("seed", config.seed),
        guide_path=path,
        mask_path=files.join(base, mask) if mask else "",
        t0_given="t0" in values,
    )


def _manifest_catalog(config: GuideInputConfig) -> Catalog:
    manifest = files.abspath(config.path)
    if not files.isfile(manifest):
        raise ValueError(f"path: manifest {config.path!r} does not exist")
    if not manifest.lower().endswith((".jsonl", ".csv")):
        raise ValueError(f"path: manifest {config.path!r} must end in .jsonl or .csv")
    try:
        records = _manifest_records(manifest)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"path: manifest {config.path!r} is not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    except csv.Error as e:
        raise ValueError(f"path: manifest {config.path!r} is not a readable CSV ({e})") from None
    rows = [_manifest_row(n, fields, error, manifest, config) for n, fields, error in records]
    if not rows:
        raise ValueError(f"path: manifest {config.path!r} has no rows")
    return _catalog(sorted(rows, key=lambda r: r.id))


def _record_row(record: bytes, shard: str, index: int, config: GuideInputConfig) -> _Row:
    source = f"{shard}#{index}"
    row = _Row(
        id=f"{os.path.basename(shard)}:{index}", source=source, t0=config.t0, seed=config.seed
    )
    try:
        fields = record_fields(record)
        raw_id = fields.get("id", row.id.encode())
        row_id = raw_id.decode("utf-8") if isinstance(raw_id, bytes) else raw_id
        if not row_id:
            raise ValueError("feature 'id': empty")
        row = dataclasses.replace(row, id=row_id)
    except (ValueError, UnicodeDecodeError) as e:
        return dataclasses.replace(row, error=f"tfrecord ({source}): {e}")
    try:
        t0 = _parse_t0(float(fields["t0"]), config) if "t0" in fields else config.t0
    except ValueError as e:
        return dataclasses.replace(row, error=f"tfrecord ({source}): feature 't0': {e}")
    try:
        seed = _parse_seed(int(fields["seed"])) if "seed" in fields else config.seed
    except ValueError as e:
        return dataclasses.replace(row, t0=t0, error=f"tfrecord ({source}): feature 'seed': {e}")
    return dataclasses.replace(row, t0=t0, seed=seed, t0_given="t0" in fields)


def _tfrecord_catalog(config: GuideInputConfig) -> Catalog:
    shards = sorted({f for pattern in config.path.split(",") for f in tf.io.gfile.glob(pattern)})
    if not shards:
        raise ValueError(f"path: no TFRecord files match {config.path!r}")
    rows, readable, corrupt = [], [], []
    for shard in shards:
        count, broken = 0, False
        try:
            for record in tf.data.TFRecordDataset(shard).as_numpy_iterator():
                rows.append(_record_row(record, shard, count, config))
                count += 1
        except tf.errors.OpError as e:
            # A corrupt record ends what can be read of a shard; the rest is
            # reported as one failure rather than dropped without a trace.
            broken = True
            rows.append(
                _Row(
                    id=f"{os.path.basename(shard)}:{count}",
                    source=f"{shard}#{count}",
                    t0=config.t0,
                    seed=config.seed,
                    error=f"tfrecord ({shard}): record {count} and all later records of this shard "
                    f"are unreadable ({type(e).__name__}: {e.message})",
                )
            )
        readable.append(count)
        corrupt.append(broken)

    def payload() -> tf.data.Dataset:
        def shard_records(path, count, broken):
            return (
                tf.data.TFRecordDataset(path)
                .take(count)
                .concatenate(
                    tf.data.Dataset.from_tensors(tf.constant(b"")).repeat(tf.cast(broken, tf.int64))
                )
            )

        records = tf.data.Dataset.from_tensor_slices(
            (shards, np.array(readable, np.int64), np.array(corrupt))
        ).flat_map(_plain(shard_records))
        return records.map(_plain(lambda r: {"record": r, "guide_bytes": "", "mask_bytes": ""}))

    return _catalog(rows, payload)


def _tfds_catalog(config: GuideInputConfig) -> Catalog:
    import tensorflow_datasets as tfds

    builder = tfds.builder(config.tfds_name, data_dir=config.tfds_data_dir)
    keys = [k for k in (config.tfds_image_key, config.tfds_mask_key) if k]
    features = builder.info.features
    for key in keys:
        if key not in features.keys() or not isinstance(features[key], tfds.features.Image):
            raise ValueError(f"tfds: {config.tfds_name} has no Image feature {key!r}")

    def examples() -> tf.data.Dataset:
        # One file at a time keeps the order identical on every pass and host.
        return builder.as_dataset(
            split=config.tfds_split,
            shuffle_files=False,
            decoders={k: tfds.decode.SkipDecoding() for k in keys},
            read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1),
        )

    ids = [i.decode() for i in examples().map(_plain(lambda e: e["tfds_id"])).as_numpy_iterator()]
    where = f"tfds://{config.tfds_name}/{config.tfds_split}"
    rows = [_Row(id=i, source=f"{where}/{i}", t0=config.t0, seed=config.seed) for i in ids]

    def payload() -> tf.data.Dataset:
        mask_key = config.tfds_mask_key
        return examples().map(
            _plain(
                lambda e: {
                    "record": "",
                    "guide_bytes": e[config.tfds_image_key],
                    "mask_bytes": e[mask_key] if mask_key else tf.constant(b""),
                }
            )
        )

    return _catalog(rows, payload)


def build_catalog(config: GuideInputConfig | Mapping[str, Any]) -> Catalog:
    """Lists every example of the configured source in canonical order (reads no pixels).

    Raises:
        ValueError: the source itself is unusable (missing folder or manifest,
            no TFRecord files); problems of single examples never raise.
    """
    config = _as_config(config)
    return {
        "folder": _folder_catalog,
        "manifest": _manifest_catalog,
        "tfrecord": _tfrecord_catalog,
        "tfds": _tfds_catalog,
    }[config.source](config)
