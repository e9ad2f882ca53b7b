"""The bundled demo guides: the paper's three tasks at the default model's 32 px.

* hand-drawn stroke paintings (flat-colour shapes drawn with Pillow, as a user
  would paint them), edited everywhere (all-ones mask);
* simulated stroke paintings of held-out emoji (:func:`guides.stroke_painting`);
* stroke edits of held-out emoji (strokes inside a mask, the rest kept);
* composites of two held-out emoji (mask = pasted region).

Layout is the folder source's (see :mod:`sdedit_jax.data.guide_inputs`):
``<name>.png`` guides and ``masks/<name>.png`` masks (white = editable).

    python -m sdedit_jax.data.demo --emoji data/emoji32 --out sdedit_jax/assets/demo
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from sdedit_jax.data import emoji, guides, images

SIZE = 32
# Held-out emoji (test split) the simulated guides are made from.
PAINT_SOURCES = ("u1f34e", "u1f345", "u1f437")  # red apple, tomato, pig face
EDIT_SOURCES = ("u1f34a", "u1f44d")  # tangerine, thumbs up
COMPOSITE_PAIRS = (("u1f353", "u1f348"), ("u1f381", "u1f3b0"))  # strawberry+melon, gift+slot


def _canvas(scale: int = 4) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    """A white canvas drawn at ``scale`` x and downsampled, for smooth strokes."""
    image = Image.new("RGB", (SIZE * scale, SIZE * scale), "white")
    return image, ImageDraw.Draw(image), scale


def _finish(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX))


def draw_smiley() -> np.ndarray:
    image, draw, s = _canvas()
    draw.ellipse([3 * s, 3 * s, 29 * s, 29 * s], fill=(250, 200, 40))
    draw.ellipse([10 * s, 10 * s, 13 * s, 15 * s], fill=(60, 40, 20))
    draw.ellipse([19 * s, 10 * s, 22 * s, 15 * s], fill=(60, 40, 20))
    draw.arc([9 * s, 12 * s, 23 * s, 24 * s], 20, 160, fill=(60, 40, 20), width=2 * s)
    return _finish(image)


def draw_heart() -> np.ndarray:
    image, draw, s = _canvas()
    draw.ellipse([5 * s, 7 * s, 17 * s, 19 * s], fill=(220, 30, 50))
    draw.ellipse([15 * s, 7 * s, 27 * s, 19 * s], fill=(220, 30, 50))
    draw.polygon([(6 * s, 15 * s), (26 * s, 15 * s), (16 * s, 27 * s)], fill=(220, 30, 50))
    return _finish(image)


def draw_tree() -> np.ndarray:
    image, draw, s = _canvas()
    draw.rectangle([14 * s, 20 * s, 18 * s, 29 * s], fill=(120, 70, 30))
    draw.polygon([(16 * s, 3 * s), (5 * s, 22 * s), (27 * s, 22 * s)], fill=(40, 150, 60))
    return _finish(image)


def draw_sun() -> np.ndarray:
    image, draw, s = _canvas()
    for angle in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        x, y = 16 + 13 * np.cos(angle), 16 + 13 * np.sin(angle)
        draw.line([(16 * s, 16 * s), (x * s, y * s)], fill=(250, 150, 20), width=2 * s)
    draw.ellipse([8 * s, 8 * s, 24 * s, 24 * s], fill=(250, 190, 30))
    return _finish(image)


def draw_ball() -> np.ndarray:
    image, draw, s = _canvas()
    draw.ellipse([5 * s, 5 * s, 27 * s, 27 * s], fill=(40, 110, 220))
    draw.ellipse([9 * s, 8 * s, 15 * s, 13 * s], fill=(150, 200, 250))
    return _finish(image)


HAND_DRAWN = {
    "paint_smiley": draw_smiley,
    "paint_heart": draw_heart,
    "paint_tree": draw_tree,
    "paint_sun": draw_sun,
    "paint_ball": draw_ball,
}


def build_demo(emoji_root: str, out_dir: str) -> list[str]:
    """Writes the demo guides and masks to ``out_dir``; returns the guide names."""
    emoji.build_emoji_folder(emoji_root, size=SIZE)
    held_out = os.path.join(emoji_root, "test")

    def load(name):
        path = os.path.join(held_out, name + ".png")
        return images.from_uint8(np.asarray(Image.open(path).convert("RGB")))

    full = np.ones((SIZE, SIZE, 1), np.float32)
    examples: dict[str, tuple[np.ndarray, np.ndarray]] = {
        name: (images.from_uint8(draw()), full) for name, draw in HAND_DRAWN.items()
    }
    for i, name in enumerate(PAINT_SOURCES):
        painted = guides.stroke_painting(load(name), i, num_colors=5, median_size=3, blur_sigma=0.5)
        examples[f"strokes_{name}"] = (np.asarray(painted), full)
    for i, name in enumerate(EDIT_SOURCES):
        edited, mask = guides.stroke_edit(
            load(name), 10 + i, num_strokes=2, width_range=(0.08, 0.12), mask_dilation=1.0
        )
        examples[f"edit_{name}"] = (np.asarray(edited), np.asarray(mask))
    for i, (base, donor) in enumerate(COMPOSITE_PAIRS):
        pasted, mask = guides.composite(load(base), load(donor), 20 + i, size_range=(0.4, 0.55))
        examples[f"composite_{base}_{donor}"] = (np.asarray(pasted), np.asarray(mask))

    os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
    for name, (guide, mask) in examples.items():
        Image.fromarray(images.to_uint8(guide)).save(os.path.join(out_dir, name + ".png"))
        mask_pixels = np.round(np.asarray(mask)[..., 0] * 255).astype(np.uint8)
        Image.fromarray(mask_pixels).save(os.path.join(out_dir, "masks", name + ".png"))
    return sorted(examples)


_EMOJI = flags.DEFINE_string("emoji", "data/emoji32", "emoji folder (built if missing)")
_OUT = flags.DEFINE_string("out", "sdedit_jax/assets/demo", "output folder")


def main(argv):
    del argv
    names = build_demo(_EMOJI.value, _OUT.value)
    print(f"wrote {len(names)} demo guides to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
