"""Offline emoji image data set rendered from Debian's Noto Color Emoji font.

Why: the default score model needs a small, colourful, varied training set that
ships with the operating system (package `fonts-noto-color-emoji`, SIL OFL), so
training and tests never download anything.

Each single-codepoint glyph of the font is drawn in colour, composited on white,
padded to a centred square, resized to `2 * size` with Lanczos and then averaged
2x2 down to `size`. Codepoints are split into `train/` and `test/` by a stable
hash of their file name, so the held-out set never changes with `limit` or the
order of rendering.

Build the full 32 px folder:

    python -m sdedit_jax.data.emoji --out data/emoji32 --size 32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
import unicodedata

from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

DEFAULT_FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
MANIFEST_NAME = "manifest.json"
# Bumped whenever rendering changes, so old folders are not mistaken for new ones.
FORMAT_VERSION = 1
# The CBDT font holds a single bitmap strike; FreeType refuses other sizes.
_BITMAP_PPEM = 109
# Controls, format characters (ZWJ, tag letters) and spaces have no visible glyph.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs"})
_TEST_PER_MILLE = 100


def emoji_codepoints(font_path: str = DEFAULT_FONT_PATH) -> list[int]:
    """Sorted codepoints the font maps to a visible glyph (read from its cmap, no rendering)."""
    if not os.path.isfile(font_path):
        raise FileNotFoundError(
            f"Emoji font {font_path!r} not found; install Debian package fonts-noto-color-emoji."
        )
    cmap = TTFont(font_path, lazy=True).getBestCmap()
    if not cmap:
        raise ValueError(f"Emoji font {font_path!r} has no Unicode cmap table.")
    return sorted(cp for cp in cmap if unicodedata.category(chr(cp)) not in _INVISIBLE_CATEGORIES)


def codepoint_name(codepoint: int) -> str:
    """File stem for a codepoint, e.g. 0x1F600 -> 'u1f600'."""
    return f"u{codepoint:04x}"


def is_held_out(name: str) -> bool:
    """Whether `name` belongs to the test split (~10%), from a hash that is stable across runs."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < _TEST_PER_MILLE


def load_font(font_path: str = DEFAULT_FONT_PATH) -> ImageFont.FreeTypeFont:
    """The emoji font at its bitmap size; basic layout so no shaping library changes the result."""
    return ImageFont.truetype(font_path, _BITMAP_PPEM, layout_engine=ImageFont.Layout.BASIC)


def render_emoji(font: ImageFont.FreeTypeFont, codepoint: int, size: int) -> Image.Image | None:
    """RGB `size` x `size` image of one glyph on white, or None if the glyph draws nothing."""
    char = chr(codepoint)
    _, _, width, height = font.getbbox(char)
    glyph = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), char, font=font, embedded_color=True)
    box = glyph.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = glyph.crop(box)
    side = max(glyph.size)
    # Composite at full resolution so resampling never mixes in transparent black.
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    offset = ((side - glyph.width) // 2, (side - glyph.height) // 2)
    canvas.alpha_composite(glyph, offset)
    upsampled = canvas.convert("RGB").resize((2 * size, 2 * size), Image.Resampling.LANCZOS)
    return upsampled.reduce(2)


def _read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_manifest(manifest: dict, out_dir: str, size: int, limit: int | None) -> dict:
    wanted = {"format_version": FORMAT_VERSION, "size": size, "limit": limit}
    found = {key: manifest.get(key) for key in wanted}
    if found != wanted:
        raise ValueError(
            f"{os.path.join(out_dir, MANIFEST_NAME)} describes {found}, not the requested "
            f"{wanted}; use another output directory or delete this one."
        )
    return manifest


def _render_into(directory: str, font_path: str, size: int, limit: int | None) -> dict:
    """Renders the PNGs into `directory` and returns the manifest (not yet written)."""
    codepoints = emoji_codepoints(font_path)[:limit]
    font = load_font(font_path)
    counts = {"train": 0, "test": 0}
    blank = []
    for split in counts:
        os.makedirs(os.path.join(directory, split))
    for codepoint in codepoints:
        image = render_emoji(font, codepoint, size)
        name = codepoint_name(codepoint)
        if image is None:
            blank.append(name)
            continue
        split = "test" if is_held_out(name) else "train"
        image.save(os.path.join(directory, split, f"{name}.png"), format="PNG")
        counts[split] += 1
    with open(font_path, "rb") as f:
        font_sha256 = hashlib.sha256(f.read()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "size": size,
        "limit": limit,
        "font_path": font_path,
        "font_sha256": font_sha256,
        "counts": counts,
        "skipped_blank": blank,
    }


def build_emoji_folder(
    out_dir: str, size: int = 32, limit: int | None = None, font_path: str = DEFAULT_FONT_PATH
) -> dict:
    """Renders the emoji image folder `out_dir/{train,test}/u<hex>.png` once.

    Idempotent and safe to call from several processes: the folder is rendered in a
    temporary sibling directory, the manifest is written last and the directory is
    renamed into place, so `out_dir` is either absent or complete.

    Args:
      out_dir: Destination directory; must not exist, be empty, or hold a finished build.
      size: Output side in pixels.
      limit: Render only the first `limit` codepoints (for quick tests).
      font_path: The CBDT colour emoji font.

    Returns:
      The manifest: counts per split, skipped blank glyphs, size, limit and font hash.
    """
    out_dir = os.path.abspath(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is not None:
        return _check_manifest(manifest, out_dir, size, limit)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(
            f"{out_dir} exists and is not empty but has no {MANIFEST_NAME}; "
            "it is an interrupted or foreign build: delete it and retry."
        )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.staging-", dir=parent)
    try:
        manifest = _render_into(staging, font_path, size, limit)
        with open(os.path.join(staging, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(staging, out_dir)
    except OSError:
        # Another process may have won the rename; its finished build is as good as ours.
        winner = _read_manifest(out_dir)
        if winner is None:
            raise
        manifest = _check_manifest(winner, out_dir, size, limit)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--limit", type=int, default=None, help="render only this many glyphs")
    parser.add_argument("--font", default=DEFAULT_FONT_PATH, help="CBDT colour emoji font")
    args = parser.parse_args()
    start = time.perf_counter()
    manifest = build_emoji_folder(args.out, size=args.size, limit=args.limit, font_path=args.font)
    print(
        f"{args.out}: {manifest['counts']} images, {len(manifest['skipped_blank'])} blank "
        f"glyphs skipped, {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
