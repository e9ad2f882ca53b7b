"""The ``folder`` source: every file under ``path`` is one example, masks in ``<mask_dir>/``.

Ids are the POSIX paths relative to ``path``; the rules (pairing, hidden files,
links, FIFOs) are in the package docstring. Its block: ``config.input.folder``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sdedit_jax.data.guide_inputs.catalog import Catalog, Source, _catalog, _file_problem, _Row
from sdedit_jax.util import files

NAME = "folder"
GUIDE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy")
MASK_EXTENSIONS = (".png", ".npy")


@dataclasses.dataclass(frozen=True)
class Options:
    """``config.input.folder``.

    Attributes:
        mask_dir: the masks folder inside the guide folder ("" = no masks).
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


SOURCE = Source(NAME, _folder_catalog, Options, moved={"mask_dir": "mask_dir"})
