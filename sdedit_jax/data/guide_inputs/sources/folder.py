"""The ``folder`` source: every file under ``path`` is one example, masks in ``<mask_dir>/``.

Ids are the POSIX paths relative to ``path``; the rules (pairing, hidden files,
links, FIFOs) are in the package docstring. Its block: ``config.input.folder``.

Captions: ``sub/cat.txt`` beside ``sub/cat.png`` is that guide's prompt (see
:mod:`sdedit_jax.data.guide_inputs.text`), never a guide itself; a caption without
a guide of its name fails. Captions are read while listing (one small read each,
on a pool of threads), so that the per-row input digest covers their text and a
resume notices an edited caption. A caption that is not UTF-8 or cannot be read
fails its guide; with a model that takes no text, a caption fails its guide unread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any

from sdedit_jax.data.guide_inputs.catalog import Catalog, Source, _catalog, _file_problem, _Row
from sdedit_jax.data.guide_inputs.text import CAPTION_EXTENSION
from sdedit_jax.util import files

# Captions read at once while listing (reads of small files; object stores gain most).
_CAPTION_THREADS = 16

NAME = "folder"
# .npz: a job's float outputs (key "image"), e.g. a first stage's arrays/ folder.
GUIDE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy", ".npz")
MASK_EXTENSIONS = (".png", ".npy")


@dataclasses.dataclass(frozen=True)
class Options:
    """``config.input.folder``.

    Attributes:
        mask_dir: the masks folder inside the guide folder ('' = no masks).
    """

    mask_dir: str = "masks"

    def __post_init__(self):
        if not isinstance(self.mask_dir, str):
            raise ValueError(f"mask_dir: expected a string, got {self.mask_dir!r}")


def _walk_files(root: str, skip: str = "") -> list[tuple[str, str]]:
    """Sorted ``(POSIX path relative to root, problem)`` of non-hidden entries, skipping ``skip``.

    Symbolic links to folders are followed (their files are inputs like any
    other), but every real folder is listed once: the tree itself first, then
    the links in the order found; a link to a folder already listed (a folder
    above it, a sibling, another link's target) is one entry with its problem.
    So link cycles end and a ladder of links that doubles the paths per level
    costs one visit per folder. Entries that are not regular files (FIFOs,
    sockets, devices, broken links) are listed with their problem, so they
    become failure rows instead of hanging the reader or vanishing; nothing is
    opened here.
    """
    if not files.is_local(root):
        return _walk_store(root, skip)
    found: list[tuple[str, str]] = []
    listed: dict[tuple[int, int], str] = {}  # (device, inode) of each folder walked -> rel
    links: list[tuple[str, str]] = []

    def walk(folder: str, rel_folder: str) -> None:
        try:
            entries = sorted(os.listdir(folder))
        except OSError as e:
            found.append((rel_folder or ".", f"cannot list folder ({e.strerror})"))
            return
        for name in entries:
            path, rel = os.path.join(folder, name), f"{rel_folder}/{name}" if rel_folder else name
            if name.startswith(".") or path == skip:
                continue
            if not os.path.isdir(path):
                found.append((rel, _file_problem(path)))
            elif os.path.islink(path):
                links.append((path, rel))
            else:
                enter(path, rel)

    def enter(path: str, rel: str) -> None:
        try:
            info = os.stat(path)
        except OSError as e:
            found.append((rel, f"cannot read ({e.strerror})"))
            return
        key = (info.st_dev, info.st_ino)
        if key in listed:
            real, parent = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
            if parent == real or parent.startswith(real.rstrip(os.sep) + os.sep):
                problem = f"symbolic link to {real}, a folder above it; not followed"
            else:
                problem = (
                    f"symbolic link to {real}, whose files are already listed "
                    f"under {listed[key] or '.'!r}; not followed"
                )
            found.append((rel, problem))
            return
        listed[key] = rel
        # A link's target is walked by its real path: a path through many links would
        # hit the kernel's limit on links per path (ELOOP) long before a ladder ends.
        walk(os.path.realpath(path) if os.path.islink(path) else path, rel)

    enter(root, "")
    while links:  # the real tree first: a link never hides a folder's own path
        batch, links[:] = list(links), []
        for path, rel in batch:
            enter(path, rel)
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


def _folder_catalog(config: Any) -> Catalog:
    """Every file under ``config.path`` (a ``GuideInputConfig``), masks paired by name."""
    mask_dir = config.options[NAME].mask_dir
    root = files.abspath(config.path)
    if not files.isdir(root):
        raise ValueError(f"path: guide folder {config.path!r} does not exist")
    mask_root = ""
    if mask_dir:
        mask_root = files.join(root, mask_dir)
        mask_root = os.path.normpath(mask_root) if files.is_local(root) else mask_root
    with_masks = bool(mask_root) and files.isdir(mask_root)
    masks_by_stem: dict[str, list[str]] = {}
    rows, guide_stems = [], set()

    def mask_failure(rel: str, reason: str) -> _Row:
        path = files.join(mask_root, rel)
        return _Row(
            id=f"{mask_dir}/{rel}",
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
    listed = _walk_files(root, skip=mask_root)
    captions = {
        os.path.splitext(rel)[0]: (files.join(root, rel), problem)
        for rel, problem in listed
        if os.path.splitext(rel)[1] == CAPTION_EXTENSION
    }
    for rel, problem in listed:
        path = files.join(root, rel)
        row = _Row(id=rel, source=path, t0=config.t0, seed=config.seed, guide_path=path)
        stem, ext = os.path.splitext(rel)
        if ext == CAPTION_EXTENSION:
            continue
        if problem:
            rows.append(dataclasses.replace(row, error=f"guide ({path}): {problem}"))
            continue
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
    rows = _with_captions(rows, captions, config.text is not None)
    for stem, mask_files in sorted(masks_by_stem.items()):
        if stem not in guide_stems:
            rows.extend(mask_failure(rel, f"no guide image named {stem}.*") for rel in mask_files)
    for stem, (path, _) in sorted(captions.items()):
        if stem not in guide_stems:
            rows.append(
                _Row(
                    id=f"{stem}{CAPTION_EXTENSION}",
                    source=path,
                    t0=config.t0,
                    seed=config.seed,
                    error=f"caption ({path}): no guide image named {os.path.basename(stem)}.*",
                )
            )
    if not rows:
        raise ValueError(f"path: guide folder {config.path!r} holds no files")
    return _catalog(sorted(rows, key=lambda r: r.id))


def _with_captions(
    rows: list[_Row], captions: dict[str, tuple[str, str]], takes_text: bool
) -> list[_Row]:
    """The rows with their captions' text as ``prompt`` (or the caption's problem as error)."""
    wanted = [
        (k, captions[os.path.splitext(row.id)[0]])
        for k, row in enumerate(rows)
        if not row.error and os.path.splitext(row.id)[0] in captions
    ]
    if not takes_text:
        read = [
            "the model takes no text (a pixel model), so a guide cannot have a caption; "
            "remove it or use a text-to-image model (config.model_dir)"
        ] * len(wanted)
        texts = [None] * len(wanted)
    else:
        with concurrent.futures.ThreadPoolExecutor(_CAPTION_THREADS, "captions") as pool:
            results = list(pool.map(lambda item: _read_caption(*item[1]), wanted))
        texts, read = [t for t, _ in results], [p for _, p in results]
    rows = list(rows)
    for (k, (path, _)), text, problem in zip(wanted, texts, read, strict=True):
        rows[k] = dataclasses.replace(
            rows[k], **({"error": f"caption ({path}): {problem}"} if problem else {"prompt": text})
        )
    return rows


def _read_caption(path: str, problem: str) -> tuple[str | None, str]:
    """``(text, "")`` of a caption file, or ``(None, why it cannot be read)``."""
    if problem:
        return None, problem
    try:
        with files.open_file(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"
    try:
        return data.decode("utf-8-sig").strip(), ""
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start}: {e.reason})"


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


SOURCE = Source(NAME, _folder_catalog, Options, moved={"mask_dir": "mask_dir"})
