"""Output file names of a job: an injective map from example ids to relative paths.

Why: ids are arbitrary strings (paths with sub-folders, TFRecord keys, user ids in
a manifest), but output files must be distinct on every file system the job may
write to, including case-insensitive ones (macOS, Windows) and ones that
normalise Unicode (HFS+). Two ids must never share a file, and no output may
need a path that another output uses as a folder.

The rule (:func:`output_name`), applied per ``/``-separated component of the id:

* A *plain* component (lower-case ASCII letters, digits, ``_``, ``-`` and ``.``,
  not starting with ``.``, at most 120 characters) is kept as it is. The last
  component ends in ``.png``: a plain id ending in ``.png`` keeps its name
  (``sub/cat.png`` -> ``sub/cat.png``); any other plain one gets ``~.png``
  (``cat.jpg`` -> ``cat.jpg~.png``, ``cat`` -> ``cat~.png``).
* Any other component (upper case, spaces, non-ASCII, a leading ``.``, ``~``,
  too long, empty) becomes its characters with everything outside the plain
  alphabet replaced by ``_`` (shortened, no leading ``.``), then ``~`` and 20 hex
  digits of the component's SHA-256 (``IMG 1.JPG`` -> ``IMG_1.JPG~<hash>.png``).
* A folder component never ends in ``.png`` (such a folder gets the hashed form),
  so a file never sits where another id needs a folder (``x`` vs ``x.png/y``).

Why it is injective: plain names contain no ``~`` and are lower case, so two of
them differ even after case folding; a ``~`` marks exactly the other two forms
(``~.png``, or ``~`` + 20 lower-case hex digits), which cannot be confused with
each other; hashed components differ unless 80-bit hashes collide. Output names
are pure ASCII, so Unicode normalisation cannot merge them. Because a hash can
in principle collide, :func:`find_clashes` checks a whole job's ids up front
(case-folded, file vs folder); the input catalog turns any clash into a failure row.

Paths a file system cannot hold (:func:`path_problem`): every component of a name
is short (at most 125 bytes), but an id can still need a path longer than the
file system allows (40 folders of 120 characters) or absurdly deep folders
(1000 levels). Such an id fails its row in the sink, naming the limit; the
rule is ``MAX_PATH_BYTES`` bytes for the whole path (Linux's PATH_MAX less the
terminating zero) and ``MAX_FOLDERS`` folder levels below the sub-job folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

_PLAIN = re.compile(r"[a-z0-9_-][a-z0-9._-]{0,119}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASH_HEX = 20
_KEEP_CHARS = 60
OUTPUT_EXTENSION = ".png"
MAX_PATH_BYTES = 4095
MAX_FOLDERS = 64


def _readable(text: str) -> str:
    return _UNSAFE.sub("_", text)[:_KEEP_CHARS].lstrip(".") or "_"


def _hashed(component: str, readable: str) -> str:
    """``<readable part>~<hash of the whole component>``."""
    digest = hashlib.sha256(component.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    return f"{_readable(readable)}~{digest}"


def _folder(component: str) -> str:
    if _PLAIN.fullmatch(component) and not component.endswith(OUTPUT_EXTENSION):
        return component
    return _hashed(component, component)


def _file(component: str) -> str:
    if _PLAIN.fullmatch(component):
        if component.endswith(OUTPUT_EXTENSION):
            return component
        return component + "~" + OUTPUT_EXTENSION
    return _hashed(component, component.removesuffix(OUTPUT_EXTENSION)) + OUTPUT_EXTENSION


def output_name(example_id: str) -> str:
    """The relative path (``a/b/name.png``, ``/``-separated) of an id's output image."""
    parts = example_id.split("/")
    return "/".join([_folder(p) for p in parts[:-1]] + [_file(parts[-1])])


def output_stem(example_id: str) -> str:
    """``output_name`` without its ``.png`` (for other outputs of the id, e.g. ``.npz``)."""
    return output_name(example_id)[: -len(OUTPUT_EXTENSION)]


def find_clashes(ids: Iterable[str]) -> dict[str, str]:
    """Ids whose output would collide with an earlier id's, mapped to that earlier id.

    A collision is an equal name after case folding, or a name that another
    output needs as a folder. Ids are taken in the given order; the first keeps
    its name.
    """
    files: dict[str, str] = {}
    folders: dict[str, str] = {}
    clashes: dict[str, str] = {}
    for example_id in ids:
        name = output_name(example_id).casefold()
        parts = name.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        other = files.get(name) or folders.get(name)
        other = other or next((files[p] for p in prefixes if p in files), None)
        if other is not None:
            clashes[example_id] = other
            continue
        files[name] = example_id
        for prefix in prefixes:
            folders.setdefault(prefix, example_id)
    return clashes


def path_problem(path: str, *, folders: int) -> str:
    """Why a file system cannot hold the output file ``path`` (``""`` if it can).

    ``folders`` is how many folder levels the id adds below the sub-job folder
    (``output_name(id).count("/")``).
    """
    size = len(path.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES or folders > MAX_FOLDERS:
        return (
            f"its output path has {size} bytes and {folders} folder levels; at most "
            f"{MAX_PATH_BYTES} bytes and {MAX_FOLDERS} levels are allowed: give the example "
            "a shorter id"
        )
    return ""
