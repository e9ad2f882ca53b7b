"""Decoding and validation of one example (plain Python, run inside ``tf.numpy_function``).

A bad file becomes a failure row naming the field and file, never an exception
that stops the stream.
"""

from __future__ import annotations

import io
import math
import os
import stat
import zipfile

import numpy as np
from PIL import Image, ImageOps

from sdedit_jax.data import images
from sdedit_jax.data.guide_inputs.catalog import (
    _file_problem,
)
from sdedit_jax.data.guide_inputs.options import (
    _NPY_MAGIC,
    _PNG_MAGIC,
    _RANGE_TOLERANCE,
    GuideInputConfig,
)
from sdedit_jax.data.records import record_fields
from sdedit_jax.util import files

# An ``.npz`` archive (a zip file): the job's own float outputs (``arrays/<stem>.npz``,
# key "image"), so a second stage reads the first's floats, not their 8-bit PNGs.
_ZIP_MAGIC = b"PK\x03\x04"
NPZ_KEY = "image"


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
    # Checked before opening (opening a device can have effects, a FIFO blocks), and
    # opened with O_NONBLOCK in case the path changes in between; the fstat rejects it.
    problem = _file_problem(path)
    if problem:
        raise BadInput(f"{label}: {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadInput(f"{label}: file not found") from None
    except OSError as e:
        raise BadInput(f"{label}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput(f"{label}: {_file_problem(path) or 'not a regular file'}")
    os.set_blocking(fd, True)
    # Named by its path, not its descriptor: decoders quote the name in failure reasons,
    # which must be identical between identical runs.
    return open(path, "rb", opener=lambda *_: fd)


def _read_npy(stream, label: str, max_pixels: int) -> np.ndarray:
    version = np.lib.format.read_magic(stream)
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
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
        raise BadInput(
            f"{label}: npy header promises {expected} bytes of {dtype} {shape}, "
            f"the file holds {max(stored, 0)}"
        )
    return np.load(stream, allow_pickle=False)


def _read_npz(stream, label: str, max_pixels: int) -> np.ndarray:
    """The ``image`` array of an ``.npz`` archive, checked as an ``.npy`` file is."""
    try:
        with zipfile.ZipFile(stream) as archive:
            member = f"{NPZ_KEY}.npy"
            if member not in archive.namelist():
                keys = sorted(n.removesuffix(".npy") for n in archive.namelist())
                raise BadInput(f"{label}: npz holds {keys}; expected the key {NPZ_KEY!r}")
            # At most 4 channels of 8 bytes per pixel, plus the header.
            if archive.getinfo(member).file_size > max_pixels * 32 + 4096:
                raise BadInput(f"{label}: npz array exceeds max_pixels={max_pixels}")
            data = archive.read(member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise BadInput(f"{label}: unreadable npz ({type(e).__name__}: {e})") from None
    return _read_npy(io.BytesIO(data), label, max_pixels)


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
            raise BadInput(
                f"{label}: size {image.height}x{image.width} exceeds max_pixels={max_pixels}"
            )
        try:
            image.load()
            # Cameras store portrait photos sideways plus an orientation tag; viewers obey it.
            image = ImageOps.exif_transpose(image)
        except Exception as e:
            raise BadInput(
                f"{label}: corrupt or truncated image data ({type(e).__name__}: {e})"
            ) from None
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
        raise BadInput(
            f"{label}: unsupported pixel format (PIL mode {image.mode}); "
            "expected 8-bit grayscale or RGB"
        )


def _read_array(path: str, data: bytes, label: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """Pixels of a PNG/JPEG/npy/npz input and their kind: ``"npy"``, ``"npz"`` (floats) or
    ``"8bit"``."""
    stream = _open(path, data, label)
    with stream:
        head = stream.read(len(_NPY_MAGIC))
        stream.seek(0)
        if head.startswith(_ZIP_MAGIC):
            return _read_npz(stream, label, max_pixels), "npz"
        if head != _NPY_MAGIC:
            return _read_pil(stream, label, max_pixels), "8bit"
        try:
            return _read_npy(stream, label, max_pixels), "npy"
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
        raise BadInput(
            f"{label}: values span [{values.min():.4g}, {values.max():.4g}], "
            f"expected [{low:g}, {high:g}]"
        )
    return np.clip(values, low, high).astype(np.float32)


def _decode_guide(path: str, data: bytes, label: str, config: GuideInputConfig) -> np.ndarray:
    """Guide ``[h, w, channels]`` float32 in ``[-1, 1]`` at its stored size."""
    pixels, kind = _read_array(path, data, label, config.max_pixels)
    if kind != "8bit":
        if not np.issubdtype(pixels.dtype, np.floating):
            raise BadInput(f"{label}: {kind} dtype {pixels.dtype}; expected float in [-1, 1]")
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.ndim != 3:
            raise BadInput(f"{label}: {kind} shape {pixels.shape}; expected [H, W] or [H, W, C]")
        if kind == "npz":
            # A job's float output: its decoder may overshoot [-1, 1]; clipped as its PNG
            # is (and as diffusers' image post-processing does between two stages).
            pixels = np.clip(_check_float_range(pixels, label, -np.inf, np.inf), -1.0, 1.0)
        else:
            pixels = _check_float_range(pixels, label, -1.0, 1.0)
    else:
        pixels = images.from_uint8(pixels)
    channels = pixels.shape[-1]
    if channels == config.channels:
        return pixels
    if channels == 1:
        return np.repeat(pixels, config.channels, axis=-1)
    if channels == 3 and config.channels == 1 and np.all(pixels == pixels[..., :1]):
        return pixels[..., :1]
    raise BadInput(
        f"{label}: {channels} channels; expected {config.channels}"
        + (" or 1 (grayscale)" if config.channels == 3 else "")
    )


def _decode_mask(path: str, data: bytes, label: str, config: GuideInputConfig) -> np.ndarray:
    """Mask ``[h, w]`` float32 in ``[0, 1]`` (1 = editable) at its stored size."""
    pixels, kind = _read_array(path, data, label, config.max_pixels)
    if kind != "8bit":
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
        raise BadInput(
            f"{label}: size {pixels.shape[0]}x{pixels.shape[1]} does not match "
            f"image_size {height}x{width} (set resize=True to resize)"
        )
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize((width, height), resample)
        )
        for c in range(pixels.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def decode_example(
    config: GuideInputConfig,
    source: str,
    guide_path: str,
    mask_path: str,
    guide_bytes: bytes,
    mask_bytes: bytes,
    record: bytes,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes and validates one example: guide ``[H, W, C]``, mask ``[H, W, 1]`` or None.

    Raises:
        BadInput: with a reason naming the field and the file.
    """
    if record:
        fields = record_fields(record)
        guide_bytes, mask_bytes = fields["image"], fields.get("mask", b"")
    guide_label = f"guide ({guide_path or source})"
    mask_label = f"mask ({mask_path or source})"
    guide = _decode_guide(guide_path, guide_bytes, guide_label, config)
    mask = None
    if mask_path or mask_bytes:
        mask = _decode_mask(mask_path, mask_bytes, mask_label, config)
        if mask.shape != guide.shape[:2]:
            raise BadInput(
                f"{mask_label}: size {mask.shape[0]}x{mask.shape[1]} does not match "
                f"guide {guide.shape[0]}x{guide.shape[1]}"
            )
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
            guide, mask = decode_example(
                config,
                source,
                guide_path.decode(),
                mask_path.decode(),
                guide_bytes,
                mask_bytes,
                record,
            )
        except BadInput as e:
            return blank_guide, blank_mask, False, str(e).encode()
        except Exception as e:
            # An exception escaping a numpy_function would stop the whole job;
            # any surprise is recorded against this example instead.
            reason = f"guide ({source}): unexpected {type(e).__name__}: {e}"
            return blank_guide, blank_mask, False, reason.encode()
        return guide, blank_mask if mask is None else mask, mask is not None, b""

    return run
