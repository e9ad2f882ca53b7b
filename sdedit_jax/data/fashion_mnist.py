"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package, read offline.

Why: a second small real data set (60000 + 10000 grey 28x28 images, labels 0..9)
that is already on disk, for tests and quick experiments without downloads.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UINT8 = 0x08


def parse_idx(data: bytes, source: str) -> np.ndarray:
    """Decodes an uncompressed idx file of unsigned bytes; `source` names it in errors.

    The idx header is two zero bytes, a type code (0x08 = uint8), the number of
    dimensions, then each dimension as a big-endian int32.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source}: not an idx file (bad magic number).")
    if data[2] != _IDX_UINT8:
        raise ValueError(f"{source}: idx type code {data[2]:#04x} is not uint8 (0x08).")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{source}: truncated idx header.")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header_size != expected:
        raise ValueError(
            f"{source}: idx shape {shape} needs {expected} bytes of data, "
            f"found {len(data) - header_size}."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx_gz(path: str) -> np.ndarray:
    """Reads a gzip-compressed idx file into a uint8 array."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found; install Debian package dataset-fashion-mnist "
            "or pass the directory that holds the idx.gz files."
        )
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip stream ({error}).") from error
    return parse_idx(data, path)


def load(split: str = "train", data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels uint8 [N] of one split ('train' or 'test')."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split {split!r} is not one of {SPLITS}.")
    prefix = os.path.join(data_dir, _FILE_PREFIX[split])
    images_path = f"{prefix}-images-idx3-ubyte.gz"
    labels_path = f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx_gz(images_path)
    labels = read_idx_gz(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected [N, rows, cols] images, got {images.shape}.")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: {labels.shape} labels do not match {len(images)} images "
            f"of {images_path}."
        )
    return images, labels


def pad_to(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Zero-pads [N, H, W, ...] images evenly to `size`; 32 suits U-Net downsampling."""
    pad_h, pad_w = size - images.shape[1], size - images.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"Cannot pad images of shape {images.shape[1:3]} to {size}.")
    widths = [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)]
    widths += [(0, 0)] * (images.ndim - 3)
    return np.pad(images, widths)


def load_images(
    split: str = "train", size: int = 32, channels: int = 1, data_dir: str = DEFAULT_DIR
) -> np.ndarray:
    """Padded images uint8 [N, size, size, channels]; channels=3 replicates grey to RGB."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    images, _ = load(split, data_dir)
    padded = pad_to(images, size)[..., np.newaxis]
    return np.repeat(padded, channels, axis=-1)
