"""The catalog: every example of a source in canonical order, with its id, t0, seed, error.

Listing reads no pixels (only folder entries, manifest rows, record headers), so a
job can count, shard and skip completed examples before decoding anything. What
every source shares lives here: :class:`Source` (what a source module declares),
rows and columns, the id rules (repeats, output-name clashes, UTF-8) and the t0 and
seed rules of inputs that name their own; each source's listing is its own module
under :mod:`.sources`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from sdedit_jax.data import names

# Seeds become int32 jax.random keys: every seed (config, manifest, record) must fit.
SEED_RANGE = (0, 2**31)


def _plain(fn: Callable) -> Callable:
    """Marks a tf.data function as plain graph code: AutoGraph would otherwise convert
    it and leave ``__autograph_generated_file*.py`` in the temp folder (forever, after a kill)."""
    return tf.autograph.experimental.do_not_convert(fn)


@dataclasses.dataclass(frozen=True)
class Source:
    """What a guide source module declares (its ``SOURCE``); the list is ``sources.MODULES``.

    Attributes:
        name: the value of ``config.input.source``.
        list_examples: ``GuideInputConfig -> Catalog``, every example in canonical
            order (raises ``ValueError`` when the source itself is unusable).
        options: the frozen dataclass of the source's own block
            ``config.input.<name>`` (checked in its ``__post_init__``), or None.
        required: fields that must be non-empty when the source is used, dotted
            inside the source's block (``"tfds.name"``).
        moved: flat keys of ``config.input`` of earlier versions -> their field in
            the block (``"tfds_name" -> "name"``); they are refused by name.
    """

    name: str
    list_examples: Callable[[Any], Catalog]
    options: type | None = None
    required: tuple[str, ...] = ("path",)
    moved: Mapping[str, str] = dataclasses.field(default_factory=dict)


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
    # The text fields the input names (None: it names none; see guide_inputs.text).
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    # The SDXL micro-conditioning fields the input names, parsed (see guide_inputs.micro).
    micro: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Metadata of all examples of a source in canonical order (no pixels are read).

    Attributes:
        columns: equal-length numpy arrays ``id`` (str), ``source``,
            ``guide_path``, ``mask_path`` and ``error`` (object arrays of str;
            ``error`` non-empty for examples already known to be bad), ``t0``
            (float32), ``t0_given`` (bool) and ``seed`` (int64); the text fields
            of :mod:`sdedit_jax.data.guide_inputs.text` (what rows name, then,
            once resolved, what they use; none when the model takes no text) and
            the micro-conditioning of :mod:`sdedit_jax.data.guide_inputs.micro`
            (likewise; only manifests name them).
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
    """The catalog of ``rows`` (already in canonical order)."""
    columns = {
        "id": _id_bytes([row.id for row in rows]),
        "t0": np.array([row.t0 for row in rows], np.float32),
        "seed": np.array([row.seed for row in rows], np.int64),
        "t0_given": np.array([row.t0_given for row in rows], bool),
    }
    for name in _TEXT + ("prompt", "negative_prompt"):
        columns[name] = _objects([getattr(row, name) for row in rows])
    columns["guidance_scale"] = np.array(
        [np.nan if row.guidance_scale is None else row.guidance_scale for row in rows], np.float32
    )
    return _columns_catalog(columns, payload=payload)


_TEXT = ("source", "guide_path", "mask_path", "error")
_SHOWN_CHARS = 80


def _shown(value: Any) -> str:
    """``repr(value)``, shortened: a failure reason must stay one readable line."""
    text = repr(value)
    return (
        text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 20]}... ({len(text)} chars)"
    )


def _objects(values: list) -> np.ndarray:
    column = np.empty(len(values), object)
    column[:] = values
    return column


def _id_bytes(ids: list[str]) -> np.ndarray:
    """Ids as UTF-8 bytes (``S``): a quarter of ``U``'s memory, and sorted alike.

    ``surrogatepass`` keeps lone surrogates (they fail later, by name) in code point order.
    """
    try:
        return np.array(ids, dtype="S")  # ASCII: a C conversion
    except UnicodeEncodeError:
        return np.array([i.encode("utf-8", "surrogatepass") for i in ids], dtype="S")


def _is_sorted(values: np.ndarray) -> bool:
    return bool(np.all(values[1:] >= values[:-1]))


def _non_ascii(values: np.ndarray) -> np.ndarray:
    """Which entries of an ``S`` array hold a byte >= 0x80."""
    raw = values.view(np.uint8).reshape(len(values), values.dtype.itemsize)
    if not raw.size or raw.max() < 0x80:
        return np.zeros(len(values), bool)
    return (raw >= 0x80).any(axis=1)


def _columns_catalog(
    columns: dict[str, np.ndarray], *, sort: bool = False, payload=None
) -> Catalog:
    """The catalog of rows given as columns (``id`` as UTF-8 ``S``, text as objects).

    With ``sort``, rows are put in canonical order: by id, ties in input order (a stable
    sort of UTF-8 bytes orders like Python's ``sorted`` of the strings). Then repeated
    ids and output-name clashes fail their rows, and ids become a ``str`` array. All of
    it in bulk: only the rare rows with a problem are looked at one by one.
    """
    ids = columns["id"]
    if sort and not _is_sorted(ids):
        order = np.argsort(ids, kind="stable")
        columns = {k: v[order] for k, v in columns.items()}
        ids = columns["id"]
    new_ids: dict[int, str] = {}
    errors = columns["error"]
    for index, first, repeat in _repeats(ids):
        new_ids[index] = f"{_text(ids[index])}#duplicate{repeat}"
        if not errors[index]:
            errors[index] = (
                f"id ({columns['source'][index]}): {_text(ids[index])!r} is already used "
                f"by {columns['source'][first]}; give every example a distinct id"
            )
    non_ascii = _non_ascii(ids)
    suspects = non_ascii.copy()
    for name in _TEXT:
        suspects |= ~np.fromiter(map(str.isascii, columns[name]), bool, len(ids))
    for index in np.flatnonzero(suspects):
        _encodable(columns, new_ids, int(index))
    if non_ascii.any():
        id_text = np.array([_text(i) for i in ids.tolist()], dtype=str)
    else:
        id_text = ids.astype(str)  # ASCII: a C conversion
    if new_ids:
        width = max(id_text.dtype.itemsize // 4, *map(len, new_ids.values()))
        id_text = id_text.astype(f"U{width}")
        for index, text in new_ids.items():
            id_text[index] = text
    for example_id, other in _clashes(id_text).items():
        for index in np.flatnonzero(id_text == example_id):
            if not errors[index]:
                errors[index] = (
                    f"id ({columns['source'][index]}): output name "
                    f"{names.output_name(example_id)!r} clashes with that of id {other!r}; "
                    "give the examples other ids"
                )
    return Catalog({**columns, "id": id_text}, payload)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _repeats(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """``(index, index of the first row with that id, k)`` of every k-th repeat of an id."""
    order = None if _is_sorted(ids) else np.argsort(ids, kind="stable")
    ranked = ids if order is None else ids[order]
    later = np.flatnonzero(ranked[1:] == ranked[:-1]) + 1
    out, run_start, previous = [], 0, -2
    for position in later.tolist():
        run_start = run_start if position == previous + 1 else position - 1
        previous = position
        index = position if order is None else int(order[position])
        first = run_start if order is None else int(order[run_start])
        out.append((index, first, position - run_start))
    return out


def _printable(text: str) -> str:
    """``text`` with what is not UTF-8 shown escaped: bytes of a file name in another
    encoding as ``\\xNN``, other lone surrogates (JSON ``"\\ud800"``) as ``\\uNNNN``."""
    if _utf8(text):
        return text
    return "".join(
        (f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}")
        if 0xD800 <= ord(c) <= 0xDFFF
        else c
        for c in text
    )


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encodable(columns: dict[str, np.ndarray], new_ids: dict[int, str], index: int) -> None:
    """Fails row ``index`` with printable text if a field is not valid UTF-8.

    Such text (a file name in another encoding, a lone surrogate in a JSON
    manifest) cannot enter the tf.data pipeline, a file name or a JSON manifest.
    """
    row_id = new_ids.get(index, _text(columns["id"][index]))
    fields = {"id": row_id, **{name: columns[name][index] for name in _TEXT}}
    bad = [f for f, text in fields.items() if not _utf8(text)]
    if not bad:
        return
    field = {"id": "id", "mask_path": "mask"}.get(bad[0], "guide")
    source = _printable(fields["source"])
    new_ids[index] = _printable(row_id)
    columns["source"][index] = source
    columns["guide_path"][index] = ""  # the row is not decoded
    columns["mask_path"][index] = ""
    columns["error"][index] = (
        f"{field} ({source}): '{_printable(fields[bad[0]] or row_id)}' is not valid UTF-8 "
        "(a byte of another encoding or a lone surrogate); rename the file or fix the id"
    )


_PLAIN_CHARS = re.compile(r"[a-z0-9._/\n-]*")
_PLAIN_ID = re.compile(r"(?:[a-z0-9_-][a-z0-9._-]*(?<!\.png)/)*[a-z0-9_-][a-z0-9._-]*")
_PLAIN_MAX = 120  # characters of a plain id (so every component is plain-sized too)
_NOT_PLAIN = re.compile(r"\n\.|/\.|//|\n/|/\n|\n\n|\.png/")  # an empty, hidden or .png folder
_CLASH_CHUNK = 1 << 14


def _all_plain(ids: list[str]) -> bool:
    """Whether every id is *plain*: at most 120 characters; components of lower-case
    ASCII letters, digits and ``._-``, non-empty, not starting with ``.``; no folder
    component ending in ``.png``.

    Checked on the joined ids by substring tests at C speed, not one regex per id.
    """
    blob = "\n".join(ids)
    return bool(
        max(map(len, ids), default=0) <= _PLAIN_MAX
        and _PLAIN_CHARS.fullmatch(blob)
        and not blob.startswith((".", "/"))
        and not blob.endswith("/")
        and not _NOT_PLAIN.search(blob)
    )


def _plain_ids(ids: list[str]) -> list[bool]:
    """Which ids are plain (see ``_all_plain``): halves are tested at C speed until the
    few that are not are found."""
    if _all_plain(ids):
        return [True] * len(ids)
    if len(ids) <= 16:
        return [len(i) <= _PLAIN_MAX and bool(_PLAIN_ID.fullmatch(i)) for i in ids]
    half = len(ids) // 2
    return _plain_ids(ids[:half]) + _plain_ids(ids[half:])


def _clashes(ids: np.ndarray) -> dict[str, str]:
    """``names.find_clashes(ids)``, looking only at the ids that are not plain.

    A plain id is its own output name (plus ``~.png`` unless it ends in ``.png``),
    so its name holds no ``~`` or ends in ``~.png``, and its folders never end in
    ``.png``; every other id's name ends in ``~<20 hex>.png`` and its folders never
    end in ``.png``. So a plain id's name never equals another id's name or folder,
    and no clash involves a plain id (``tests/test_guide_inputs.py`` checks the
    equality on a corpus). A million plain ids cost a few substring scans.
    """
    suspects = []
    for start in range(0, len(ids), _CLASH_CHUNK):
        chunk = ids[start : start + _CLASH_CHUNK].tolist()
        suspects += [i for i, plain in zip(chunk, _plain_ids(chunk), strict=True) if not plain]
    return names.find_clashes(suspects)


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


class _HugeInt:
    """A JSON integer longer than Python converts (``sys.get_int_max_str_digits``)."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _int_or_huge(text: str) -> int | _HugeInt:
    try:
        return int(text)
    except ValueError:  # past the int-str conversion limit (4300 digits by default)
        return _HugeInt(text)


def _parse_t0(value: Any, config: Any) -> float:
    """A given t0 checked against ``config``'s (a ``GuideInputConfig``) time domain."""
    if isinstance(value, _HugeInt):
        raise ValueError(f"{value!r} is not in {config.time_domain_text()}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {_shown(value)}")
    try:
        t0 = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"expected a number, got {_shown(value)}") from None
    if not config.in_time_domain(t0):
        raise ValueError(f"{_shown(value)} is not in {config.time_domain_text()}")
    return t0


def _parse_seed(value: Any) -> int:
    if isinstance(value, _HugeInt):
        raise ValueError(f"{value!r} is not in [0, 2^31)")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected an integer, got {_shown(value)}")
    try:
        seed = int(value)
    except ValueError:
        raise ValueError(f"expected an integer, got {_shown(value)}") from None
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"{_shown(value)} is not in [0, 2^31)")
    return seed
