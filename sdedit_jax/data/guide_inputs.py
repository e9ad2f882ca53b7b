"""Guide inputs of a batch edit job: sources, validation, host sharding, padding, resume.

Sources (``GuideInputConfig.source``):

* ``"folder"``: every file under ``path`` (recursively) is one example; ids are
  the POSIX paths relative to ``path`` (``"sub/cat.png"``). Guides are
  ``.png``, ``.jpg``, ``.jpeg`` (8-bit) or ``.npy`` (float ``[H, W]`` or
  ``[H, W, C]`` in ``[-1, 1]``). **Mask pairing rule:** if the folder
  ``path/<mask_dir>`` (default ``masks/``) exists, every guide ``sub/cat.<ext>``
  needs exactly one mask ``<mask_dir>/sub/cat.png`` or ``<mask_dir>/sub/cat.npy``;
  without that folder no guide has a mask. Hidden files and folders (``.x``)
  are ignored; any other file with an unsupported extension, a guide without
  its mask, and a mask without a guide are reported as failures.
* ``"tfrecord"``: ``path`` is a comma-separated list of globs of TFRecord shards
  of ``tf.train.Example`` with features ``image`` (bytes: PNG/JPEG/npy
  encoded, required), ``mask`` (bytes, optional), ``id`` (bytes, default
  ``"<shard name>:<record index>"``), ``t0`` (float, optional), ``seed``
  (int64, optional); other features are ignored. :func:`tf_example` writes them.
* ``"tfds"``: a prepared TFDS data set (``tfds_name``, ``tfds_split``,
  ``tfds_data_dir``; never downloaded), images from ``tfds_image_key`` and
  optional masks from ``tfds_mask_key``; ids are TFDS's stable ``tfds_id``.
* ``"manifest"``: ``path`` is a ``.jsonl`` file (one JSON object per line) or a
  ``.csv`` file (header row) with fields ``path`` (required), ``mask``, ``t0``,
  ``seed``, ``id`` (default: ``path`` as written). Relative paths are resolved
  against the manifest's folder. Unknown fields fail the row (a typo such as
  ``tO`` must not silently fall back to the default).

``generator`` (``"stroke_painting"``, ``"stroke_edit"`` or ``"composite"``,
see :mod:`sdedit_jax.data.guides`) turns each decoded image into a synthetic
guide; it is how evaluation builds guides from held-out images. Its
randomness depends only on the example's (seed, id). ``stroke_edit`` and
``composite`` replace any source mask with their own; the donor of
``composite`` is the next example of the source in canonical order (the last
uses the first), so it too is independent of sharding and resume.

The t0 rule (``T0_ROWS``): an example whose input names its own ``t0`` (the
``t0`` field of a manifest row or TFRecord) is edited exactly once, at that
t0; a job puts all such examples in one sub-job (``t0_per_example/``). Every
other example is edited once per configured t0 (``t0_<t0>/``). So no output
is ever duplicated across t0 folders.

Canonical order and sharding: examples are listed in a canonical order (sorted
ids for folders and manifests; sorted shard names then record order for
TFRecords; TFDS's file order) that every host computes identically. Example
``i`` belongs to host ``i % process_count``; the assignment is made before
completed examples are skipped, so an example always stays with the same host
and a host's remaining work depends only on its own finished outputs.

Validation: no bad input aborts the job and none is dropped. Every example
flows through the pipeline with ``ok`` and ``error`` columns; ``error`` names
the field and file, e.g. ``"mask (/data/masks/a.png): size 31x32 does not
match guide 32x32"``. Failed rows carry a zero guide, a zero mask and the
default ``t0``, so they are harmless if the engine computes them anyway.
Rules: grayscale is replicated to RGB, palette images are expanded, RGBA is
accepted only if fully opaque; two-channel (gray+alpha) and 16-bit images
(including 16-bit PNGs, which PIL would silently truncate) fail. Images are
turned upright by their EXIF orientation tag, as viewers show them. Masks are
grayscale (RGB masks must have equal channels), 255 (or 1.0) = editable, soft
values allowed; an 8-bit mask holding only the values 0 and 1 is read as a
binary {0, 1} mask (1 = editable), since 1/255 is no meaningful soft value.
Seeds (config, manifest, record) must lie in [0, 2^31). File names that are
not valid UTF-8, FIFOs and other non-regular files, broken symbolic links and
links to a folder above themselves fail (links to other folders are followed);
a CSV header that repeats a column or a JSON row that repeats a key fails its
rows. ``.npy`` headers are checked (shape, size, file length) before reading.
Every id's output name (:mod:`sdedit_jax.data.names`) must be distinct; a
clash fails the later id. A mask whose size differs from its guide
always fails; a guide whose size differs from ``image_size`` fails unless
``resize`` is set. Images over ``max_pixels``, non-finite or out-of-range
``.npy`` values, and ``t0`` outside ``(t0_min, 1]`` fail.

Batches: every host yields exactly :attr:`GuideStream.num_steps` batches of
``batch_size_per_host`` rows; rows past a host's last example are padding
with ``valid = False``. Resume: ids in ``completed`` are skipped before
batching, so a restarted job does no repeated work (batch composition
changes, outputs do not: they depend only on (seed, id)).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import stat
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

from sdedit_jax import files
from sdedit_jax.data import guides, names

SOURCES = ("folder", "tfrecord", "tfds", "manifest")
GENERATOR_NAMES = ("none", *guides.GENERATORS)
GUIDE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy")
MASK_EXTENSIONS = (".png", ".npy")
MANIFEST_FIELDS = ("path", "mask", "t0", "seed", "id")
# The t0 rule: an input that names its own t0 (a manifest or TFRecord field) is
# edited once, at that t0 ("own" rows: the job's ``t0_per_example`` sub-job);
# every other input is edited at each configured t0 ("configured" rows).
T0_ROWS = ("all", "configured", "own")
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Seeds become int32 jax.random keys: every seed (config, manifest, record) must fit.
SEED_RANGE = (0, 2**31)
# npy values may exceed the nominal range by float round-off.
_RANGE_TOLERANCE = 1e-3


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclasses.dataclass(frozen=True)
class GuideInputConfig:
    """Where a job's guides come from and how they are decoded.

    Attributes:
        source: one of ``SOURCES`` (see the module docstring).
        path: folder, manifest file, or comma-separated TFRecord globs.
        image_size: ``(height, width)`` of the model (an int means square).
        channels: 3 (RGB) or 1 (grayscale).
        resize: resize guides (bicubic) and masks (nearest) of another size to
            ``image_size``; otherwise such guides fail.
        t0: default SDEdit start time.
        t0_min: per-example ``t0`` must lie in ``(t0_min, 1]`` (the SDE's eps).
        seed: job seed, the default per-example seed.
        mask_dir: the masks folder inside a guide folder ("" = no masks).
        tfds_name, tfds_split, tfds_data_dir: the TFDS data set.
        tfds_image_key, tfds_mask_key: its image and (optional) mask features.
        generator: ``"none"`` or a guide generator name (see ``guides.GENERATORS``).
        generator_kwargs: keyword arguments of the generator.
        max_pixels: larger images fail before they are decoded.
        num_parallel_calls: decode parallelism (-1 = autotune).
        prefetch_batches: batches prefetched ahead of the device loop.
    """

    source: str
    path: str = ""
    image_size: tuple[int, int] = (256, 256)
    channels: int = 3
    resize: bool = False
    t0: float = 0.5
    t0_min: float = 1e-3
    seed: int = 0
    mask_dir: str = "masks"
    tfds_name: str = ""
    tfds_split: str = "test"
    tfds_data_dir: str | None = None
    tfds_image_key: str = "image"
    tfds_mask_key: str = ""
    generator: str = "none"
    generator_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_pixels: int = 1 << 26
    num_parallel_calls: int = tf.data.AUTOTUNE
    prefetch_batches: int = 2

    def __post_init__(self):
        size = self.image_size
        size = (size, size) if _is_int(size) else size
        if not (isinstance(size, (tuple, list)) and len(size) == 2
                and all(_is_int(s) and s >= 1 for s in size)):
            raise ValueError(f"image_size: expected (height, width) of positive ints, "
                             f"got {self.image_size!r}")
        object.__setattr__(self, "image_size", tuple(int(s) for s in size))
        object.__setattr__(self, "generator", self.generator or "none")
        if not isinstance(self.generator_kwargs, Mapping):
            raise ValueError(f"generator_kwargs: expected a mapping, got {self.generator_kwargs!r}")
        object.__setattr__(self, "generator_kwargs", dict(self.generator_kwargs))
        if self.source not in SOURCES:
            raise ValueError(f"source: expected one of {SOURCES}, got {self.source!r}")
        if self.channels not in (1, 3) or not _is_int(self.channels):
            raise ValueError(f"channels: expected 1 or 3, got {self.channels!r}")
        if not (_is_number(self.t0_min) and 0 <= self.t0_min < 1):
            raise ValueError(f"t0_min: expected a number in [0, 1), got {self.t0_min!r}")
        if not (_is_number(self.t0) and self.t0_min < self.t0 <= 1.0):
            raise ValueError(f"t0: expected a number in ({self.t0_min}, 1], got {self.t0!r}")
        if not (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise ValueError(f"seed: expected an integer in [0, 2^31), got {self.seed!r}")
        for name in ("max_pixels", "prefetch_batches"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not (_is_int(self.num_parallel_calls)
                and (self.num_parallel_calls >= 1 or self.num_parallel_calls == tf.data.AUTOTUNE)):
            raise ValueError(f"num_parallel_calls: expected a positive int or -1 (autotune), "
                             f"got {self.num_parallel_calls!r}")
        for name in ("path", "mask_dir", "tfds_name", "tfds_split", "tfds_image_key",
                     "tfds_mask_key", "generator"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if not isinstance(self.resize, bool):
            raise ValueError(f"resize: expected True or False, got {self.resize!r}")
        if self.generator not in GENERATOR_NAMES:
            raise ValueError(
                f"generator: expected one of {GENERATOR_NAMES}, got {self.generator!r}"
            )
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("tfds_name: required when source is 'tfds'")
        if self.source != "tfds" and not self.path:
            raise ValueError(f"path: required when source is {self.source!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> GuideInputConfig:
        """Builds a config from a dict or ``ml_collections.ConfigDict`` (unknown keys fail)."""
        values = mapping.to_dict() if hasattr(mapping, "to_dict") else dict(mapping)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"guide input config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**values)


def _plain(fn: Callable) -> Callable:
    """Marks a tf.data function as plain graph code: AutoGraph would otherwise convert
    it and leave ``__autograph_generated_file*.py`` in the temp folder (forever, after a kill)."""
    return tf.autograph.experimental.do_not_convert(fn)


# --- catalog: every example of a source, in canonical order, without pixels ----------------------


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
        unique.append(dataclasses.replace(row, id=f"{row.id}#duplicate{repeats[row.id]}",
                                          error=row.error or reason))
    unique = [_encodable(row) for row in unique]
    clashes = names.find_clashes(row.id for row in unique)
    unique = [row if row.id not in clashes else dataclasses.replace(row, error=row.error or (
        f"id ({row.source}): output name {names.output_name(row.id)!r} clashes with that of id "
        f"{clashes[row.id]!r}; give the examples other ids")) for row in unique]
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
    """``text`` with bytes that are not UTF-8 (file names) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
    return dataclasses.replace(row, **shown, guide_path="", mask_path="", error=(
        f"{field} ({shown['source']}): name is not valid UTF-8; rename the file"))


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
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device",
             stat.S_ISBLK: "a device"}
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
        subfolders[:] = [f for f in subfolders
                         if not f.startswith(".") and files.join(folder, f) != skip]
        rel_folder = "" if folder == root else files.relpath(folder, root)
        found += [(f"{rel_folder}/{n}" if rel_folder else n, "") for n in entries
                  if not n.startswith(".")]
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
    for rel, problem in _walk_files(mask_root) if with_masks else []:
        if problem:
            path = files.join(mask_root, rel)
            rows.append(_Row(id=f"{config.mask_dir}/{rel}", source=path, t0=config.t0,
                             seed=config.seed, error=f"mask ({path}): {problem}"))
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
            rows.append(dataclasses.replace(
                row, error=f"guide ({path}): unsupported extension {ext!r}; expected one of "
                           f"{GUIDE_EXTENSIONS}"))
            continue
        guide_stems.add(stem)
        if with_masks:
            row = _pair_mask(row, stem, masks_by_stem.get(stem, []), mask_root)
        rows.append(row)
    for stem, mask_files in sorted(masks_by_stem.items()):
        if stem not in guide_stems:
            for rel in mask_files:
                path = files.join(mask_root, rel)
                rows.append(_Row(id=f"{config.mask_dir}/{rel}", source=path, t0=config.t0,
                                 seed=config.seed,
                                 error=f"mask ({path}): no guide image named {stem}.*"))
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
    if not (math.isfinite(t0) and config.t0_min < t0 <= 1.0):
        raise ValueError(f"{value!r} is not in ({config.t0_min}, 1]")
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
                    records.append((reader.line_num, None,
                                    f"the header repeats column(s) {repeated}"))
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


def _manifest_row(number: int, fields: dict | None, error: str, manifest: str,
                  config: GuideInputConfig) -> _Row:
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
    problems = [f"unknown field {k!r} (known: {', '.join(MANIFEST_FIELDS)})"
                for k in sorted(fields, key=str) if k not in MANIFEST_FIELDS]
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
    return _Row(id=row_id, source=path, t0=values.get("t0", config.t0),
                seed=values.get("seed", config.seed), guide_path=path,
                mask_path=files.join(base, mask) if mask else "", t0_given="t0" in values)


def _manifest_catalog(config: GuideInputConfig) -> Catalog:
    manifest = files.abspath(config.path)
    if not files.isfile(manifest):
        raise ValueError(f"path: manifest {config.path!r} does not exist")
    if not manifest.lower().endswith((".jsonl", ".csv")):
        raise ValueError(f"path: manifest {config.path!r} must end in .jsonl or .csv")
    try:
        records = _manifest_records(manifest)
    except UnicodeDecodeError as e:
        raise ValueError(f"path: manifest {config.path!r} is not UTF-8 text (byte {e.start}: "
                         f"{e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"path: manifest {config.path!r} is not a readable CSV ({e})") from None
    rows = [_manifest_row(n, fields, error, manifest, config) for n, fields, error in records]
    if not rows:
        raise ValueError(f"path: manifest {config.path!r} has no rows")
    return _catalog(sorted(rows, key=lambda r: r.id))


def tf_example(image: bytes, *, id: str | None = None, mask: bytes | None = None,
               t0: float | None = None, seed: int | None = None) -> bytes:
    """A serialized ``tf.train.Example`` in the layout the ``"tfrecord"`` source reads."""
    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}
    if id is not None:
        feature["id"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[id.encode()]))
    if mask is not None:
        feature["mask"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[mask]))
    if t0 is not None:
        feature["t0"] = tf.train.Feature(float_list=tf.train.FloatList(value=[t0]))
    if seed is not None:
        feature["seed"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[seed]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


_RECORD_KINDS = {"image": "bytes_list", "mask": "bytes_list", "id": "bytes_list",
                 "t0": "float_list", "seed": "int64_list"}


def _record_fields(record: bytes) -> dict[str, Any]:
    """The known features of a serialized example (one value each), or ValueError naming one."""
    try:
        example = tf.train.Example.FromString(record)
    except Exception as e:  # protobuf raises its own DecodeError type
        raise ValueError(f"not a tf.train.Example ({type(e).__name__}: {e})") from e
    fields = {}
    for name, kind in _RECORD_KINDS.items():
        if name not in example.features.feature:
            continue
        feature = example.features.feature[name]
        if feature.WhichOneof("kind") != kind:
            raise ValueError(f"feature {name!r}: expected {kind}, got {feature.WhichOneof('kind')}")
        values = getattr(feature, kind).value
        if len(values) != 1:
            raise ValueError(f"feature {name!r}: expected one value, got {len(values)}")
        fields[name] = values[0]
    if "image" not in fields:
        raise ValueError("feature 'image': missing")
    return fields


def _record_row(record: bytes, shard: str, index: int, config: GuideInputConfig) -> _Row:
    source = f"{shard}#{index}"
    row = _Row(id=f"{os.path.basename(shard)}:{index}", source=source, t0=config.t0,
               seed=config.seed)
    try:
        fields = _record_fields(record)
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
            rows.append(_Row(
                id=f"{os.path.basename(shard)}:{count}", source=f"{shard}#{count}",
                t0=config.t0, seed=config.seed,
                error=f"tfrecord ({shard}): record {count} and all later records of this shard "
                      f"are unreadable ({type(e).__name__}: {e.message})"))
        readable.append(count)
        corrupt.append(broken)

    def payload() -> tf.data.Dataset:
        def shard_records(path, count, broken):
            return tf.data.TFRecordDataset(path).take(count).concatenate(
                tf.data.Dataset.from_tensors(tf.constant(b"")).repeat(tf.cast(broken, tf.int64)))

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
            split=config.tfds_split, shuffle_files=False,
            decoders={k: tfds.decode.SkipDecoding() for k in keys},
            read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1),
        )

    ids = [i.decode() for i in examples().map(_plain(lambda e: e["tfds_id"])).as_numpy_iterator()]
    where = f"tfds://{config.tfds_name}/{config.tfds_split}"
    rows = [_Row(id=i, source=f"{where}/{i}", t0=config.t0, seed=config.seed) for i in ids]

    def payload() -> tf.data.Dataset:
        mask_key = config.tfds_mask_key
        return examples().map(_plain(lambda e: {
            "record": "", "guide_bytes": e[config.tfds_image_key],
            "mask_bytes": e[mask_key] if mask_key else tf.constant(b""),
        }))

    return _catalog(rows, payload)


def build_catalog(config: GuideInputConfig | Mapping[str, Any]) -> Catalog:
    """Lists every example of the configured source in canonical order (reads no pixels).

    Raises:
        ValueError: the source itself is unusable (missing folder or manifest,
            no TFRecord files); problems of single examples never raise.
    """
    config = _as_config(config)
    return {
        "folder": _folder_catalog, "manifest": _manifest_catalog,
        "tfrecord": _tfrecord_catalog, "tfds": _tfds_catalog,
    }[config.source](config)


# --- decoding and validation of one example (Python, run inside tf.numpy_function) ---------------


class BadInput(Exception):
    """A problem with one example; its message is the failure reason."""


def _open(path: str, data: bytes, label: str):
    if data:
        return io.BytesIO(data)
    if not files.is_local(path):
        try:
            return io.BytesIO(files.read_bytes(path))
        except FileNotFoundError:
            raise BadInput(f"{label}: file not found") from None
        except OSError as e:
            raise BadInput(f"{label}: cannot read ({e})") from None
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat rejects it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadInput(f"{label}: file not found") from None
    except OSError as e:
        raise BadInput(f"{label}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput(f"{label}: {_file_problem(path) or 'not a regular file'}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_npy(stream, label: str, max_pixels: int) -> np.ndarray:
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise BadInput(f"{label}: unsupported npy format version {version}")
    try:
        shape, _, dtype = readers[version](stream)
    except ValueError as e:
        raise BadInput(f"{label}: unreadable npy header ({e})") from None
    # Check the header against limits and the file's length before numpy allocates it.
    if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[2] <= 4):
        raise BadInput(f"{label}: npy shape {shape}; expected [H, W] or [H, W, C] with C <= 4")
    if shape[0] * shape[1] > max_pixels:
        raise BadInput(f"{label}: size {shape[0]}x{shape[1]} exceeds max_pixels={max_pixels}")
    expected = math.prod(shape) * dtype.itemsize
    header_end = stream.tell()
    stored = stream.seek(0, io.SEEK_END) - header_end
    stream.seek(0)
    if stored < expected:
        raise BadInput(f"{label}: npy header promises {expected} bytes of {dtype} {shape}, "
                       f"the file holds {max(stored, 0)}")
    return np.load(stream, allow_pickle=False)


def _png_bit_depth(stream) -> int:
    """The bit depth in a PNG's header (0 if the stream is not a PNG)."""
    head = stream.read(25)
    stream.seek(0)
    return head[24] if len(head) == 25 and head.startswith(_PNG_MAGIC) else 0


def _read_pil(stream, label: str, max_pixels: int) -> np.ndarray:
    """8-bit pixels ``[H, W, 1 or 3]``, turned upright by the EXIF orientation tag.

    Palette and CMYK/YCbCr images become RGB; RGBA loses its alpha only if opaque.
    16-bit PNGs fail (PIL would silently drop their low bytes).
    """
    if _png_bit_depth(stream) == 16:
        raise BadInput(f"{label}: 16-bit PNG; expected 8 bits per channel (convert it to 8-bit)")
    try:
        image = Image.open(stream)
    except Exception as e:  # PIL raises many types for unreadable headers
        raise BadInput(f"{label}: not a decodable image ({type(e).__name__}: {e})") from None
    with image:
        if image.width * image.height > max_pixels:
            raise BadInput(f"{label}: size {image.height}x{image.width} exceeds "
                           f"max_pixels={max_pixels}")
        try:
            image.load()
            # Cameras store portrait photos sideways plus an orientation tag; viewers obey it.
            image = ImageOps.exif_transpose(image)
        except Exception as e:
            raise BadInput(f"{label}: corrupt or truncated image data "
                           f"({type(e).__name__}: {e})") from None
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("1", "L"):
            return np.asarray(image.convert("L"))[..., None]
        if image.mode in ("RGB", "CMYK", "YCbCr"):
            return np.asarray(image.convert("RGB"))
        if image.mode == "RGBA":
            pixels = np.asarray(image)
            if np.any(pixels[..., 3] != 255):
                raise BadInput(f"{label}: has transparent pixels; alpha is not supported")
            return pixels[..., :3]
        if image.mode in ("LA", "La", "PA"):
            raise BadInput(f"{label}: 2 channels (mode {image.mode}); expected grayscale or RGB")
        raise BadInput(f"{label}: unsupported pixel format (PIL mode {image.mode}); "
                       "expected 8-bit grayscale or RGB")


def _read_array(path: str, data: bytes, label: str, max_pixels: int) -> tuple[np.ndarray, bool]:
    """Pixels of a PNG/JPEG/npy input and whether they came from npy (floats) or 8-bit."""
    stream = _open(path, data, label)
    with stream:
        is_npy = stream.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        stream.seek(0)
        if not is_npy:
            return _read_pil(stream, label, max_pixels), False
        try:
            return _read_npy(stream, label, max_pixels), True
        except BadInput:
            raise
        except Exception as e:  # numpy raises ValueError/OSError/EOFError on bad files
            raise BadInput(f"{label}: unreadable npy ({type(e).__name__}: {e})") from None


def _check_float_range(values: np.ndarray, label: str, low: float, high: float) -> np.ndarray:
    bad = np.count_nonzero(~np.isfinite(values))
    if bad:
        raise BadInput(f"{label}: {bad} non-finite values")
    tolerance = _RANGE_TOLERANCE
    if values.size and (values.min() < low - tolerance or values.max() > high + tolerance):
        raise BadInput(f"{label}: values span [{values.min():.4g}, {values.max():.4g}], "
                       f"expected [{low:g}, {high:g}]")
    return np.clip(values, low, high).astype(np.float32)


def _decode_guide(path: str, data: bytes, label: str, config: GuideInputConfig) -> np.ndarray:
    """Guide ``[h, w, channels]`` float32 in ``[-1, 1]`` at its stored size."""
    pixels, is_npy = _read_array(path, data, label, config.max_pixels)
    if is_npy:
        if not np.issubdtype(pixels.dtype, np.floating):
            raise BadInput(f"{label}: npy dtype {pixels.dtype}; expected float in [-1, 1]")
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.ndim != 3:
            raise BadInput(f"{label}: npy shape {pixels.shape}; expected [H, W] or [H, W, C]")
        pixels = _check_float_range(pixels, label, -1.0, 1.0)
    else:
        pixels = pixels.astype(np.float32) / 127.5 - 1.0
    channels = pixels.shape[-1]
    if channels == config.channels:
        return pixels
    if channels == 1:
        return np.repeat(pixels, config.channels, axis=-1)
    if channels == 3 and config.channels == 1 and np.all(pixels == pixels[..., :1]):
        return pixels[..., :1]
    raise BadInput(f"{label}: {channels} channels; expected {config.channels}"
                   + (" or 1 (grayscale)" if config.channels == 3 else ""))


def _decode_mask(path: str, data: bytes, label: str, config: GuideInputConfig) -> np.ndarray:
    """Mask ``[h, w]`` float32 in ``[0, 1]`` (1 = editable) at its stored size."""
    pixels, is_npy = _read_array(path, data, label, config.max_pixels)
    if is_npy:
        if not (np.issubdtype(pixels.dtype, np.floating) or pixels.dtype == bool):
            raise BadInput(f"{label}: npy dtype {pixels.dtype}; expected bool or float in [0, 1]")
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        if pixels.ndim != 2:
            raise BadInput(f"{label}: npy shape {pixels.shape}; expected [H, W] or [H, W, 1]")
        return _check_float_range(pixels.astype(np.float32), label, 0.0, 1.0)
    if pixels.shape[-1] == 3 and np.any(pixels != pixels[..., :1]):
        raise BadInput(f"{label}: RGB channels differ; a mask must be grayscale (255 = editable)")
    pixels = pixels[..., 0]
    if pixels.max(initial=0) == 1:
        # Only 0 and 1: a binary mask saved as {0, 1} rather than {0, 255} (1/255 is no
        # meaningful soft value), so 1 means editable.
        return pixels.astype(np.float32)
    return pixels.astype(np.float32) / 255.0


def _fit(pixels: np.ndarray, label: str, config: GuideInputConfig, resample) -> np.ndarray:
    """``pixels[h, w, c]`` at ``image_size``, resized only when ``config.resize`` allows it."""
    height, width = config.image_size
    if pixels.shape[:2] == (height, width):
        return pixels
    if not config.resize:
        raise BadInput(f"{label}: size {pixels.shape[0]}x{pixels.shape[1]} does not match "
                       f"image_size {height}x{width} (set resize=True to resize)")
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize((width, height),
                                                                                resample))
        for c in range(pixels.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def decode_example(config: GuideInputConfig, source: str, guide_path: str, mask_path: str,
                   guide_bytes: bytes, mask_bytes: bytes, record: bytes
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes and validates one example: guide ``[H, W, C]``, mask ``[H, W, 1]`` or None.

    Raises:
        BadInput: with a reason naming the field and the file.
    """
    if record:
        fields = _record_fields(record)
        guide_bytes, mask_bytes = fields["image"], fields.get("mask", b"")
    guide_label = f"guide ({guide_path or source})"
    mask_label = f"mask ({mask_path or source})"
    guide = _decode_guide(guide_path, guide_bytes, guide_label, config)
    mask = None
    if mask_path or mask_bytes:
        mask = _decode_mask(mask_path, mask_bytes, mask_label, config)
        if mask.shape != guide.shape[:2]:
            raise BadInput(f"{mask_label}: size {mask.shape[0]}x{mask.shape[1]} does not match "
                           f"guide {guide.shape[0]}x{guide.shape[1]}")
    guide = np.clip(_fit(guide, guide_label, config, Image.Resampling.BICUBIC), -1.0, 1.0)
    if mask is not None:
        mask = _fit(mask[..., None], mask_label, config, Image.Resampling.NEAREST)
    return guide.astype(np.float32), None if mask is None else mask.astype(np.float32)


def _decode_or_reason(config: GuideInputConfig):
    """The numpy_function body: never raises, returns ``(guide, mask, has_mask, reason)``."""
    height, width = config.image_size
    blank_guide = np.zeros((height, width, config.channels), np.float32)
    blank_mask = np.zeros((height, width, 1), np.float32)

    def run(source, guide_path, mask_path, guide_bytes, mask_bytes, record, error):
        if error:
            return blank_guide, blank_mask, False, error
        source = source.decode()
        try:
            guide, mask = decode_example(config, source, guide_path.decode(), mask_path.decode(),
                                         guide_bytes, mask_bytes, record)
        except BadInput as e:
            return blank_guide, blank_mask, False, str(e).encode()
        except Exception as e:
            # An exception escaping a numpy_function would stop the whole job;
            # any surprise is recorded against this example instead.
            reason = f"guide ({source}): unexpected {type(e).__name__}: {e}"
            return blank_guide, blank_mask, False, reason.encode()
        return guide, blank_mask if mask is None else mask, mask is not None, b""

    return run


# --- the tf.data pipeline ------------------------------------------------------------------------


def _decode_in_graph(element: dict, config: GuideInputConfig) -> dict:
    height, width = config.image_size
    guide, mask, has_mask, error = tf.numpy_function(
        _decode_or_reason(config),
        [element[k] for k in ("source", "guide_path", "mask_path", "guide_bytes", "mask_bytes",
                              "record", "error")],
        [tf.float32, tf.float32, tf.bool, tf.string],
    )
    guide.set_shape([height, width, config.channels])
    mask.set_shape([height, width, 1])
    has_mask.set_shape([])
    error.set_shape([])
    return {"guide": guide, "mask": tf.where(has_mask, mask, tf.ones_like(mask)), "error": error}


def _example_seed(element: dict) -> tf.Tensor:
    """Generator seed from (seed, id) only, never from the position in the stream."""
    id_hash = tf.strings.to_hash_bucket_fast(element["id"], 2**63 - 1)
    return tf.stack([element["seed"], id_hash])


def _process(element: dict, config: GuideInputConfig) -> dict:
    """Decodes, applies the generator, and blanks failed rows."""
    decoded = _decode_in_graph(element, config)
    guide, mask, error = decoded["guide"], decoded["mask"], decoded["error"]
    generator = guides.GENERATORS.get(config.generator)
    kwargs = config.generator_kwargs
    if config.generator == "stroke_painting":
        guide = generator(guide, _example_seed(element), **kwargs)
    elif config.generator == "stroke_edit":
        guide, mask = generator(guide, _example_seed(element), **kwargs)
    elif config.generator == "composite":
        donor = _decode_in_graph(element["donor"], config)
        donor_failed = tf.strings.length(donor["error"]) > 0
        error = tf.where((tf.strings.length(error) == 0) & donor_failed,
                         "composite donor: " + donor["error"], error)
        guide, mask = generator(guide, donor["guide"], _example_seed(element), **kwargs)
    guide = tf.ensure_shape(guide, [*config.image_size, config.channels])
    mask = tf.ensure_shape(mask, [*config.image_size, 1])
    ok = tf.strings.length(error) == 0
    return {
        "id": element["id"],
        "source": element["source"],
        "guide": tf.where(ok, guide, tf.zeros_like(guide)),
        "mask": tf.where(ok, mask, tf.zeros_like(mask)),
        "t0": tf.where(ok, element["t0"], tf.constant(config.t0, tf.float32)),
        "seed": element["seed"],
        "valid": tf.constant(True),
        "ok": ok,
        "error": error,
        "index": element["index"],
    }


def _padding_row(config: GuideInputConfig) -> dict:
    height, width = config.image_size
    return {
        "id": tf.constant(""), "source": tf.constant(""),
        "guide": tf.zeros([height, width, config.channels]),
        "mask": tf.zeros([height, width, 1]),
        "t0": tf.constant(config.t0, tf.float32),
        "seed": tf.constant(config.seed, tf.int64),
        "valid": tf.constant(False), "ok": tf.constant(False), "error": tf.constant(""),
        "index": tf.constant(-1, tf.int64),
    }


def _rows_dataset(catalog: Catalog, indices: np.ndarray | None = None) -> tf.data.Dataset:
    """Catalog rows with their payload, in canonical order: all, or only ``indices``.

    Only catalogs without a payload can be sliced (a payload is a stream).
    """
    if indices is None:
        indices = np.arange(len(catalog), dtype=np.int64)
    columns = {k: v[indices] for k, v in catalog.columns.items()}
    columns = {k: tf.constant(v.tolist(), tf.string) if v.dtype == object else v
               for k, v in columns.items()}
    rows = tf.data.Dataset.from_tensor_slices(dict(columns, index=indices.astype(np.int64)))
    if catalog.payload is None:
        payload = tf.data.Dataset.from_tensors(
            {"record": tf.constant(b""), "guide_bytes": tf.constant(b""),
             "mask_bytes": tf.constant(b"")}).repeat()
    else:
        payload = catalog.payload()
    return tf.data.Dataset.zip(rows, payload).map(_plain(lambda row, data: {**row, **data}))


def _done_mask(ids: np.ndarray, completed) -> np.ndarray:
    """Which ids are completed; ``completed`` is a collection or has a vectorised ``contains``
    (``sinks.CompletedIds``: hashes, so a million ids cost no million-string set)."""
    if hasattr(completed, "contains"):
        return np.asarray(completed.contains(ids), bool)
    completed = frozenset(completed)
    return np.fromiter((i in completed for i in ids.tolist()), bool, len(ids))


def global_num_steps(host_counts: Collection[int], batch_size_per_host: int) -> int:
    """Steps every host must run so that the host with the most examples finishes."""
    return max((math.ceil(c / batch_size_per_host) for c in host_counts), default=0)


@dataclasses.dataclass(frozen=True)
class GuideStream:
    """One host's batches of a job.

    Attributes:
        dataset: exactly ``num_steps`` batches, each a dict of
            ``batch_size`` rows: ``id``, ``source``, ``error`` (tf.string),
            ``guide`` [B,H,W,C] and ``mask`` [B,H,W,1] (float32), ``t0``
            (float32), ``seed`` and ``index`` (int64, canonical position, -1 on
            padding), ``valid`` (False on padding) and ``ok`` (False on
            padding and failed examples).
        num_steps: batches per host, equal on every host.
        batch_size: rows per batch on this host.
        host_counts: examples left to do on each host.
        process_index: this host.
        total_examples: examples of the source in this stream's ``t0_rows`` (all hosts,
            done or not).
        num_skipped: examples skipped because they were completed (all hosts).
    """

    dataset: tf.data.Dataset
    num_steps: int
    batch_size: int
    host_counts: tuple[int, ...]
    process_index: int
    total_examples: int
    num_skipped: int

    @property
    def num_examples(self) -> int:
        """Examples this job will process, all hosts together."""
        return sum(self.host_counts)

    @property
    def local_examples(self) -> int:
        """Examples this host will process (the rest of its rows are padding)."""
        return self.host_counts[self.process_index]


def _as_config(config) -> GuideInputConfig:
    return config if isinstance(config, GuideInputConfig) else GuideInputConfig.from_mapping(config)


def make_guide_dataset(
    config: GuideInputConfig | Mapping[str, Any],
    *,
    batch_size_per_host: int,
    process_index: int | None = None,
    process_count: int | None = None,
    completed: Collection[str] = frozenset(),
    num_steps: int | None = None,
    catalog: Catalog | None = None,
    t0_rows: str = "all",
) -> GuideStream:
    """Builds this host's stream of guide batches.

    Args:
        config: a ``GuideInputConfig`` or a mapping of its fields.
        batch_size_per_host: rows per batch on this host.
        process_index, process_count: this host and the number of hosts
            (default: ``jax.process_index()``, ``jax.process_count()``).
        completed: ids already done (``sinks.completed_index``, or any collection); they are
            skipped before batching. Every host must pass the same set for
            the hosts to agree on ``num_steps``; read it before any host writes,
            or agree on the step count across hosts and pass ``num_steps``.
        num_steps: batches to yield (default: the least that serves every
            host); more steps add padding batches.
        catalog: a prebuilt ``build_catalog(config)`` (avoids listing twice).
        t0_rows: which examples this stream holds (see ``T0_ROWS``): ``"all"``,
            ``"configured"`` (those without their own t0, edited at
            ``config.t0``) or ``"own"`` (those whose input names a t0).

    Returns:
        The host's ``GuideStream``.
    """
    config = _as_config(config)
    if batch_size_per_host < 1:
        raise ValueError(f"batch_size_per_host: must be >= 1, got {batch_size_per_host}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: {process_index} not in [0, {process_count})")
    catalog = build_catalog(config) if catalog is None else catalog
    if t0_rows not in T0_ROWS:
        raise ValueError(f"t0_rows: expected one of {T0_ROWS}, got {t0_rows!r}")
    selected = {"all": np.ones(len(catalog), bool), "configured": ~catalog.columns["t0_given"],
                "own": catalog.columns["t0_given"]}[t0_rows]
    # Rows outside the selection count as neither to do nor done.
    done = _done_mask(catalog.columns["id"], completed) & selected
    left = ~done & selected
    owner = np.arange(len(catalog)) % process_count
    host_counts = tuple(int(np.sum(left & (owner == p))) for p in range(process_count))
    needed = global_num_steps(host_counts, batch_size_per_host)
    if num_steps is None:
        num_steps = needed
    elif num_steps < needed:
        raise ValueError(f"num_steps: {num_steps} is fewer than the {needed} steps needed")

    mine = left & (owner == process_index)
    if catalog.payload is None:
        # Resume: the rows to do are picked in numpy; filtering a million finished rows
        # through tf.data would cost a minute before the first batch.
        indices = np.flatnonzero(mine)
        rows = _rows_dataset(catalog, indices)
        if config.generator == "composite":
            donors = _rows_dataset(catalog, (indices + 1) % len(catalog))
            rows = tf.data.Dataset.zip(rows, donors).map(
                _plain(lambda row, donor: {**row, "donor": donor}))
    else:
        keep = tf.constant(mine)
        rows = _rows_dataset(catalog)
        if config.generator == "composite":
            donors = rows.skip(1).concatenate(rows.take(1))
            rows = tf.data.Dataset.zip(rows, donors).map(
                _plain(lambda row, donor: {**row, "donor": donor}))
        rows = rows.filter(_plain(lambda row: tf.gather(keep, row["index"])))
    dataset = (
        rows.map(_plain(lambda row: _process(row, config)),
             num_parallel_calls=config.num_parallel_calls, deterministic=True)
        .concatenate(tf.data.Dataset.from_tensors(_padding_row(config)).repeat())
        .batch(batch_size_per_host, drop_remainder=True)
        .take(num_steps)
        .prefetch(config.prefetch_batches)
    )
    options = tf.data.Options()
    options.deterministic = True
    return GuideStream(
        dataset=dataset.with_options(options),
        num_steps=num_steps,
        batch_size=batch_size_per_host,
        host_counts=host_counts,
        process_index=process_index,
        total_examples=int(selected.sum()),
        num_skipped=int(done.sum()),
    )


def preview_examples(config: GuideInputConfig | Mapping[str, Any], catalog: Catalog,
                     ids: Collection[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{id: (guide, mask)}`` of the good examples among ``ids``, exactly as a job sees them.

    Runs the job's own pipeline (generators included) on just these rows, so
    a contact sheet can be rebuilt after a resume without keeping guides around.
    """
    wanted = frozenset(ids)
    stream = make_guide_dataset(
        config, batch_size_per_host=max(1, len(wanted)), process_index=0, process_count=1,
        completed=frozenset(catalog.ids) - wanted, catalog=catalog)
    found = {}
    for batch in stream.dataset.as_numpy_iterator():
        for row, example_id in enumerate(batch["id"]):
            if batch["valid"][row] and batch["ok"][row]:
                found[example_id.decode()] = (batch["guide"][row], batch["mask"][row])
    return found
