"""The contact sheet: guide | mask | output per sub-job, for the first ids of a finished job."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from sdedit_jax.data import guide_inputs, image_grid, images
from sdedit_jax.jobs import manifest, sinks
from sdedit_jax.util import files


def read_png(path: str) -> np.ndarray:
    """An output PNG in ``[-1, 1]``; any error names the file (an OSError: exit status 1)."""
    try:
        with Image.open(io.BytesIO(files.read_bytes(path))) as image:
            return images.from_uint8(np.asarray(image.convert("RGB")))
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for damaged files
        raise OSError(f"contact sheet: cannot read {path}: {' '.join(str(e).split())}") from None


FILE = "contact_sheet.png"
CONTACT_ROWS = 16


def write(
    workdir: str,
    subdirs: dict[str, str],
    inputs: guide_inputs.GuideInputConfig,
    catalog: guide_inputs.Catalog,
) -> str | None:
    """guide | mask | output per sub-job for the first ids (canonical order) with a PNG output.

    ``subdirs`` maps column labels (``"t0=0.3"``) to sub-job folders.

    A function of the finished workdir and the inputs only, so a resumed job
    writes the same sheet as an uninterrupted one; published atomically.
    """
    outputs = {}
    for t0, sub in subdirs.items():
        for row in manifest.read_rows(files.join(sub, f"{manifest.MANIFEST}.jsonl"))[0]:
            if isinstance(row.get("output"), str):
                outputs[(row["id"], t0)] = files.join(sub, row["output"])
    chosen = [i for i in sorted(catalog.ids) if any((i, t0) in outputs for t0 in subdirs)]
    chosen = chosen[:CONTACT_ROWS]
    if not chosen:
        return None
    previews = guide_inputs.preview_examples(inputs, catalog, chosen)
    rows, names = [], []
    for example_id in chosen:
        if example_id not in previews:
            continue
        guide, mask = previews[example_id]
        cells = [guide, mask * 2.0 - 1.0]
        for t0 in subdirs:
            path = outputs.get((example_id, t0))
            cells.append(None if path is None else read_png(path))
        rows.append(cells)
        names.append(os.path.splitext(example_id)[0])
    labels = ["guide", "mask", *subdirs]
    buffer = io.BytesIO()
    image_grid.contact_sheet(rows, labels, names).save(buffer, format="PNG")
    path = files.join(workdir, FILE)
    sinks.atomic_write_bytes(path, buffer.getvalue())
    return path
