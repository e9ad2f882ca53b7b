"""Image folders and the one pixel conversion, shared by inputs, outputs, data builders and tests.

Why: one definition of "the images in a folder" (extensions, recursion, a
stable sorted order) keeps every consumer of a folder seeing the same files in
the same order, which the deterministic input pipeline depends on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdedit_jax.util import files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def from_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (or their float values) in ``[0, 255]`` to float32 ``[-1, 1]``."""
    return np.asarray(pixels, np.float32) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Maps ``[-1, 1]`` floats to uint8 (clipped, rounded to nearest)."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def is_image_file(name: str) -> bool:
    """Whether a file name has one of the supported image extensions (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(root: str) -> list[str]:
    """Sorted paths of all PNG/JPEG files under `root`, recursively.

    Sorting by path relative to `root` makes the order independent of the file
    system's directory enumeration order.
    """
    if not files.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist or is not a directory.")
    relative = []
    for directory, _, names in files.walk(root):
        relative += [
            files.relpath(files.join(directory, name), root)
            for name in names
            if is_image_file(name)
        ]
    if not relative:
        raise ValueError(f"Image folder {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files.")
    return [files.join(root, path) for path in sorted(relative)]


def load_image_folder(root: str, mode: str = "RGB") -> np.ndarray:
    """All images under `root` as uint8 [N, H, W, C] in `list_image_files` order (equal sizes)."""
    arrays = []
    for path in list_image_files(root):
        with files.open_file(path) as f, Image.open(f) as image:
            arrays.append(np.asarray(image.convert(mode)))
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1:
        raise ValueError(f"Images under {root!r} differ in shape: {sorted(shapes)}.")
    stacked = np.stack(arrays)
    return stacked if stacked.ndim == 4 else stacked[..., np.newaxis]
