"""The bundled 256 px guides: SDEdit's three tasks on real photos.

The published 256 px checkpoints (LSUN church and bedroom, CelebA-HQ, FFHQ)
need 256 px guides. Photos cannot be downloaded here, so these come from the
photos scikit-image ships (astronaut, coffee, chelsea, rocket), centre-cropped
to squares and area-resized to 256 x 256, then turned into:

* ``paint_<photo>``: simulated stroke paintings (:func:`guides.stroke_painting`),
  edited everywhere (all-ones mask);
* ``edit_<photo>``: stroke edits (:func:`guides.stroke_edit`), flat strokes on
  the photo, edited inside the stroke mask;
* ``composite_<what>``: a region of one photo pasted into another with
  :func:`compositing.paste`, edited inside the (dilated) pasted region.

Layout is the folder source's (see :mod:`sdedit_jax.data.guide_inputs`):
``<name>.png`` guides and ``masks/<name>.png`` masks (white = editable).
Everything depends only on the photos and the fixed seeds below:

    python -m sdedit_jax.data.photos --out sdedit_jax/assets/photos_256
"""

from __future__ import annotations

from sdedit_jax.util import quiet

quiet.import_tensorflow()  # before anything else imports it (no C++ start-up notices)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from sdedit_jax.data import compositing, guides, images  # noqa: E402

SIZE = 256
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
# Stroke paintings of 256 px photos: a wider median than the 32 px default
# flattens texture into strokes, as a person painting coarse colour areas would.
PAINT_KWARGS = {"num_colors": 6, "median_size": 7, "blur_sigma": 1.5}
EDIT_KWARGS = {"num_strokes": 3, "width_range": (0.04, 0.08), "mask_dilation": 4.0}
# (name, source photo, region ellipse (cx, cy, rx, ry) in the 256 px source,
#  target photo, top-left corner (x, y) in the target, scale), chosen by eye.
COMPOSITES = (
    ("composite_cat_on_astronaut", "chelsea", (128, 120, 80, 96), "astronaut", (140, 120), 0.6),
    ("composite_cup_on_rocket", "coffee", (120, 110, 82, 66), "rocket", (6, 160), 0.55),
)
COMPOSITE_DILATION = 4


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo, centre-cropped and area-resized to uint8 ``[256, 256, 3]``."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(pixels[top : top + side, left : left + side])
    return np.asarray(square.resize((SIZE, SIZE), Image.Resampling.BOX))


def ellipse_region(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Bool ``[size, size]``: pixel centres inside the ellipse."""
    y, x = np.mgrid[:size, :size] + 0.5
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def build_photo_guides(out_dir: str) -> list[str]:
    """Writes the photo guides and masks to ``out_dir``; returns the guide names."""
    photos = {name: load_photo(name) for name in PHOTOS}
    full = np.ones((SIZE, SIZE), bool)
    examples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, name in enumerate(PHOTOS):
        painted = guides.stroke_painting(images.from_uint8(photos[name]), i, **PAINT_KWARGS)
        examples[f"paint_{name}"] = (images.to_uint8(painted), full)
        edited, mask = guides.stroke_edit(images.from_uint8(photos[name]), 10 + i, **EDIT_KWARGS)
        examples[f"edit_{name}"] = (images.to_uint8(edited), np.asarray(mask)[..., 0] > 0.5)
    for name, source, ellipse, target, at, scale in COMPOSITES:
        region = ellipse_region(SIZE, *ellipse)
        examples[name] = compositing.paste(
            photos[source], region, photos[target], at, scale, COMPOSITE_DILATION
        )
    for name, (guide, mask) in examples.items():
        compositing.write_guide(out_dir, name, guide, mask)
    return sorted(examples)


def main(argv):
    del argv
    out = flags.FLAGS.out
    names = build_photo_guides(out)
    print(f"wrote {len(names)} photo guides to {out}")


if __name__ == "__main__":
    # Defined here, not at import: tests import this module beside other commands.
    flags.DEFINE_string("out", "sdedit_jax/assets/photos_256", "output folder")
    app.run(main)
