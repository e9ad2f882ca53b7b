"""Pre-flight check of a job's guides against its model: image headers of the first inputs.

A guide whose size differs from the model's fails on its own (one failure row)
unless ``input.resize`` is set. When every guide has another size, a job would
compile and run each sub-job only to list every input as failed; so before
anything is compiled or written, the headers of the first :data:`SAMPLE`
inputs (a few small reads however long the catalog: a million-row job starts
as fast) are read, and when none of the readable ones has the model's size the
job stops with one line naming the option that fixes it. A mixed sample, and
every input after it, stays a matter of per-row failures.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from sdedit_jax.data import guide_inputs
from sdedit_jax.data.guide_inputs.decode import _open  # never blocks on a FIFO
from sdedit_jax.data.guide_inputs.options import _NPY_MAGIC
from sdedit_jax.data.records import record_fields

SAMPLE = 16
# EXIF orientations that turn the image by 90 degrees: decoding swaps height and width.
_TRANSPOSING = (5, 6, 7, 8)
_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def header_size(stream) -> tuple[int, int] | None:
    """``(height, width)`` of a PNG/JPEG/npy as decoding will see it (EXIF orientation
    applied), read from its header only; None when the header is unreadable."""
    try:
        if stream.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            stream.seek(0)
            read_header = _NPY_HEADERS.get(np.lib.format.read_magic(stream))
            shape = () if read_header is None else read_header(stream)[0]
            return tuple(shape[:2]) if len(shape) in (2, 3) else None
        stream.seek(0)
        with Image.open(stream) as image:
            size = (image.height, image.width)
            turned = image.getexif().get(0x0112) in _TRANSPOSING
            return size[::-1] if turned else size
    except Exception:  # noqa: BLE001 - an unreadable file is that row's failure, not ours
        return None


def _sample_sizes(catalog: guide_inputs.Catalog, count: int) -> Iterator[tuple[str, tuple]]:
    """``(source, (height, width))`` of the readable guides among the first ``count`` rows."""
    columns = catalog.columns
    if catalog.payload is None:
        streams = ((b"", columns["guide_path"][i]) for i in range(min(count, len(catalog))))
    else:
        items = catalog.payload().take(count).as_numpy_iterator()
        streams = ((_encoded_guide(item), "") for item in items)
    for i, (data, path) in enumerate(streams):
        if columns["error"][i] or not (data or path):
            continue
        try:
            stream = _open(path, data, f"guide ({path})")
        except guide_inputs.BadInput:
            continue
        with stream:
            size = header_size(stream)
        if size is not None:
            yield columns["source"][i], size


def _encoded_guide(item: dict) -> bytes:
    """The guide's encoded bytes of a record source's payload row (b"" if none)."""
    if item["record"]:
        try:
            return record_fields(item["record"]).get("image", b"")
        except ValueError:
            return b""
    return item["guide_bytes"]


def check_guide_sizes(
    inputs: guide_inputs.GuideInputConfig, catalog: guide_inputs.Catalog, model_dir: str
) -> None:
    """Raises ``ValueError`` (one line) when no sampled guide has ``inputs.image_size``.

    ``inputs.image_size`` is the model's size (the job checks that first); with
    ``inputs.resize`` every size fits.
    """
    if inputs.resize:
        return
    sampled = list(_sample_sizes(catalog, SAMPLE))
    target = tuple(inputs.image_size)
    if not sampled or any(size == target for _, size in sampled):
        return
    sizes = ", ".join(sorted({f"{h}x{w}" for _, (h, w) in sampled}))
    wanted = f"{target[0]}x{target[1]}"
    raise ValueError(
        f"config.input.resize: got False, but the first {len(sampled)} readable guides are "
        f"{sizes} (e.g. {sampled[0][0]}) and the model (config.model_dir={model_dir!r}) takes "
        f"{wanted}; set --config.input.resize=True to resize them to {wanted}, or use a "
        f"model of their size (--config.model_dir=...)"
    )
