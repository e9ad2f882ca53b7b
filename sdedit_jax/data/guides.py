"""The SDEdit paper's synthetic guides, as pure TensorFlow ops.

Evaluation builds guides from held-out real images the way the paper
describes its three guide types:

* :func:`stroke_painting`: a stroke painting made from a real image by
  smoothing it (median filter, optional Gaussian blur) and quantising its
  colours into a few flat colours (k-means in colour space), as the paper does
  to synthesise stroke inputs for its stroke-to-image experiments.
* :func:`stroke_edit`: a real image with a few flat-colour strokes painted on
  it, and the (dilated) stroke region as the edit mask.
* :func:`composite`: a region of a donor image pasted into the image, with the
  pasted region as the edit mask.

Images are float32 ``[H, W, C]`` in ``[-1, 1]``; masks are float32
``[H, W, 1]`` with 1 = editable. Randomness comes only from stateless TF ops
driven by ``seed``, so a guide depends on (image, seed) alone and the functions
give the same result eagerly and inside ``tf.data.Dataset.map``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tensorflow as tf

COMPOSITE_SHAPES = ("ellipse", "rectangle")


def stateless_seed(seed: int | tf.Tensor) -> tf.Tensor:
    """A ``[2]`` int64 seed for ``tf.random.stateless_*`` from a scalar or ``[2]`` seed."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape.rank == 0:
        return tf.stack([seed, tf.constant(0, tf.int64)])
    if seed.shape.rank != 1 or seed.shape[0] != 2:
        raise ValueError(f"seed: expected a scalar or shape [2], got shape {seed.shape}")
    return seed


def _check_image(image: tf.Tensor) -> tf.Tensor:
    image = tf.convert_to_tensor(image, tf.float32)
    if image.shape.rank != 3:
        raise ValueError(f"image: expected [H, W, C], got shape {image.shape}")
    return image


def _pixel_grid(height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Row and column coordinates ``[H, W]`` of the pixel centres (float32)."""
    rows = tf.cast(tf.range(height), tf.float32)
    cols = tf.cast(tf.range(width), tf.float32)
    return tf.meshgrid(rows, cols, indexing="ij")


def _with_static_shapes(
    image: tf.Tensor, guide: tf.Tensor, mask: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Restores the static shapes lost in dynamic-shape ops (tf.data batching needs them)."""
    return tf.ensure_shape(guide, image.shape), tf.ensure_shape(mask, [*image.shape[:2], 1])


# --- stroke painting ---------------------------------------------------------------------------


def median_filter(image: tf.Tensor, size: int) -> tf.Tensor:
    """Per-channel median over ``size x size`` windows (odd ``size``, reflected borders).

    The median flattens texture while keeping edges, which is what makes the
    quantised result look like flat strokes instead of noisy posterisation.
    """
    image = _check_image(image)
    if size <= 1:
        return image
    if size % 2 == 0:
        raise ValueError(f"median_size: must be odd, got {size}")
    radius = size // 2
    padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    patches = tf.image.extract_patches(
        padded[None],
        sizes=[1, size, size, 1],
        strides=[1, 1, 1, 1],
        rates=[1, 1, 1, 1],
        padding="VALID",
    )[0]
    shape = tf.shape(image)
    windows = tf.reshape(patches, [shape[0], shape[1], size * size, shape[2]])
    return tf.sort(windows, axis=2)[:, :, (size * size) // 2, :]


def gaussian_blur(image: tf.Tensor, sigma: float) -> tf.Tensor:
    """Separable Gaussian blur with reflected borders (``sigma`` in pixels; 0 = identity)."""
    image = _check_image(image)
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    kernel /= tf.reduce_sum(kernel)
    channels = tf.shape(image)[2]
    padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")[None]
    column_kernel = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    row_kernel = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(padded, column_kernel, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, row_kernel, [1, 1, 1, 1], "VALID")
    return blurred[0]


def _squared_distances(points: tf.Tensor, centres: tf.Tensor) -> tf.Tensor:
    """``[N, K]`` squared Euclidean distances between ``points[N, C]`` and ``centres[K, C]``."""
    return tf.reduce_sum(tf.square(points[:, None, :] - centres[None, :, :]), axis=-1)


def kmeans_palette(
    pixels: tf.Tensor, num_colors: int, seed: tf.Tensor, iterations: int
) -> tf.Tensor:
    """``num_colors`` colour centres ``[K, C]`` of ``pixels[N, C]`` by k-means++ and Lloyd steps.

    k-means++ seeding keeps the few colours spread over the image's palette
    (random seeding often wastes centres on one dominant colour); a fixed
    number of Lloyd iterations keeps the cost and the result deterministic.
    A centre whose cluster empties keeps its previous value.
    """
    seeds = tf.random.experimental.stateless_split(stateless_seed(seed), num_colors)
    num_pixels = tf.shape(pixels)[0]
    first = tf.random.stateless_uniform([], seeds[0], 0, num_pixels, dtype=tf.int32)
    centres = pixels[first][None]
    for k in range(1, num_colors):
        nearest = tf.reduce_min(_squared_distances(pixels, centres), axis=1)
        # Sampling proportional to the squared distance (the k-means++ rule);
        # the floor keeps log finite when every pixel already has a centre.
        logits = tf.math.log(tf.maximum(nearest, 1e-12))[None]
        pick = tf.random.stateless_categorical(logits, 1, seeds[k], dtype=tf.int32)[0, 0]
        centres = tf.concat([centres, pixels[pick][None]], axis=0)
    for _ in range(iterations):
        labels = tf.argmin(_squared_distances(pixels, centres), axis=1, output_type=tf.int32)
        sums = tf.math.unsorted_segment_sum(pixels, labels, num_colors)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(pixels[:, :1]), labels, num_colors)
        centres = tf.where(counts > 0, sums / tf.maximum(counts, 1.0), centres)
    return centres


@dataclasses.dataclass(frozen=True)
class StrokePainting:
    """Simulated stroke painting of an image: smooth, then quantise to flat colours.

    Options are checked when the generator is built (a config error, before any
    image is read); calling it is :func:`stroke_painting`.

    Attributes:
        num_colors: number of flat colours (at most this many appear).
        median_size: odd median-filter window in pixels (1 = off).
        blur_sigma: Gaussian blur applied after the median filter (0 = off).
        iterations: Lloyd iterations of the colour k-means.
        max_fit_pixels: the palette is fitted on a regular subsample of at most
            about this many pixels (then applied to all), bounding the cost on
            large images.
    """

    num_colors: int = 6
    median_size: int = 5
    blur_sigma: float = 1.0
    iterations: int = 10
    max_fit_pixels: int = 16384

    def __post_init__(self):
        if self.num_colors < 1:
            raise ValueError(f"num_colors: must be >= 1, got {self.num_colors}")

    def __call__(self, image: tf.Tensor, seed: int | tf.Tensor) -> tf.Tensor:
        """``[H, W, C]`` float32 in ``[-1, 1]`` of at most ``num_colors`` colours.

        ``image`` is ``[H, W, C]`` float32 in ``[-1, 1]``; ``seed`` (scalar or ``[2]``)
        seeds the k-means initialisation.
        """
        image = _check_image(image)
        smooth = gaussian_blur(median_filter(image, self.median_size), self.blur_sigma)
        shape = tf.shape(smooth)
        pixels = tf.reshape(smooth, [-1, shape[2]])
        stride = tf.maximum(1, tf.shape(pixels)[0] // self.max_fit_pixels)
        centres = kmeans_palette(pixels[::stride], self.num_colors, seed, self.iterations)
        labels = tf.argmin(_squared_distances(pixels, centres), axis=1, output_type=tf.int32)
        painting = tf.reshape(tf.gather(centres, labels), shape)
        return tf.ensure_shape(painting, image.shape)


def stroke_painting(image: tf.Tensor, seed: int | tf.Tensor, **options: Any) -> tf.Tensor:
    """``StrokePainting(**options)(image, seed)``: the stroke painting of ``image``."""
    return StrokePainting(**options)(image, seed)


# --- stroke editing ----------------------------------------------------------------------------


def _segment_distances(
    rows: tf.Tensor, cols: tf.Tensor, starts: tf.Tensor, ends: tf.Tensor
) -> tf.Tensor:
    """Distance ``[H, W, S]`` from each pixel to the nearest segment of each of S polylines.

    ``starts``/``ends`` are ``[S, J, 2]`` (row, col) segment end points.
    """
    points = tf.stack([rows, cols], axis=-1)[:, :, None, None, :]
    direction = ends - starts
    length_sq = tf.maximum(tf.reduce_sum(tf.square(direction), axis=-1), 1e-12)
    along = tf.reduce_sum((points - starts) * direction, axis=-1) / length_sq
    closest = starts + tf.clip_by_value(along, 0.0, 1.0)[..., None] * direction
    distances = tf.norm(points - closest, axis=-1)
    return tf.reduce_min(distances, axis=-1)


@dataclasses.dataclass(frozen=True)
class StrokeEdit:
    """Random flat-colour strokes painted on an image, and the region they cover as the mask.

    Each stroke is a thick polyline whose points follow a short random walk,
    painted in one random colour; later strokes cover earlier ones. The mask is
    the union of the strokes widened by ``mask_dilation`` pixels, so the edit
    may also blend the strokes' borders into the image.

    Attributes:
        num_strokes: number of strokes (>= 1).
        points_per_stroke: polyline vertices per stroke (>= 2).
        max_step: largest step between vertices, as a fraction of each side.
        width_range: stroke width range, as a fraction of the shorter side.
        mask_dilation: extra mask margin around the strokes, in pixels.
    """

    num_strokes: int = 3
    points_per_stroke: int = 4
    max_step: float = 0.25
    width_range: tuple[float, float] = (0.04, 0.1)
    mask_dilation: float = 2.0

    def __post_init__(self):
        if self.num_strokes < 1:
            raise ValueError(f"num_strokes: must be >= 1, got {self.num_strokes}")
        if self.points_per_stroke < 2:
            raise ValueError(f"points_per_stroke: must be >= 2, got {self.points_per_stroke}")

    def __call__(self, image: tf.Tensor, seed: int | tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``guide [H, W, C]`` in ``[-1, 1]`` and ``mask [H, W, 1]`` in ``{0, 1}``.

        ``image`` is ``[H, W, C]`` float32 in ``[-1, 1]``; ``seed`` is a scalar or ``[2]``.
        """
        image = _check_image(image)
        shape = tf.shape(image)
        size = tf.cast(shape[:2], tf.float32)
        start_seed, step_seed, width_seed, color_seed = tf.unstack(
            tf.random.experimental.stateless_split(stateless_seed(seed), 4)
        )
        start = tf.random.stateless_uniform([self.num_strokes, 1, 2], start_seed)
        steps = tf.random.stateless_uniform(
            [self.num_strokes, self.points_per_stroke - 1, 2],
            step_seed,
            -self.max_step,
            self.max_step,
        )
        vertices = tf.clip_by_value(tf.cumsum(tf.concat([start, steps], axis=1), axis=1), 0.0, 1.0)
        vertices *= size - 1.0
        widths = tf.random.stateless_uniform([self.num_strokes], width_seed, *self.width_range)
        widths = tf.maximum(widths * tf.reduce_min(size), 1.0)
        colors = tf.random.stateless_uniform([self.num_strokes, shape[2]], color_seed, -1.0, 1.0)

        rows, cols = _pixel_grid(shape[0], shape[1])
        distances = _segment_distances(rows, cols, vertices[:, :-1], vertices[:, 1:])
        guide = image
        for stroke in range(self.num_strokes):
            inside = distances[:, :, stroke : stroke + 1] <= widths[stroke] / 2
            guide = tf.where(inside, colors[stroke], guide)
        covered = tf.reduce_any(
            distances <= widths / 2 + self.mask_dilation, axis=-1, keepdims=True
        )
        return _with_static_shapes(image, guide, tf.cast(covered, tf.float32))


def stroke_edit(
    image: tf.Tensor, seed: int | tf.Tensor, **options: Any
) -> tuple[tf.Tensor, tf.Tensor]:
    """``StrokeEdit(**options)(image, seed)``: ``(guide, mask)``."""
    return StrokeEdit(**options)(image, seed)


# --- compositing -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Composite:
    """A random region of a donor image pasted into the image at the same place.

    Attributes:
        shape: ``"ellipse"`` or ``"rectangle"``.
        size_range: region extent range, as a fraction of each side.
    """

    shape: str = "ellipse"
    size_range: tuple[float, float] = (0.25, 0.5)

    def __post_init__(self):
        if self.shape not in COMPOSITE_SHAPES:
            raise ValueError(f"shape: expected one of {COMPOSITE_SHAPES}, got {self.shape!r}")

    def __call__(
        self, image: tf.Tensor, donor: tf.Tensor, seed: int | tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """``guide [H, W, C]`` (donor inside the region, image outside) and ``mask [H, W, 1]``.

        ``image`` and ``donor`` are ``[H, W, C]`` float32 in ``[-1, 1]`` of one shape;
        ``seed`` is a scalar or ``[2]``. The mask (``{0, 1}``) marks the pasted region.
        """
        image, donor = _check_image(image), _check_image(donor)
        tf.debugging.assert_equal(
            tf.shape(image), tf.shape(donor), message="composite: donor shape differs from image"
        )
        dims = tf.shape(image)
        size = tf.cast(dims[:2], tf.float32)
        extent_seed, centre_seed = tf.unstack(
            tf.random.experimental.stateless_split(stateless_seed(seed), 2)
        )
        half = tf.random.stateless_uniform([2], extent_seed, *self.size_range) * size / 2
        half = tf.maximum(half, 0.5)
        # The centre keeps the whole region inside the image.
        centre = half + tf.random.stateless_uniform([2], centre_seed) * tf.maximum(
            size - 2 * half, 0
        )
        rows, cols = _pixel_grid(dims[0], dims[1])
        offset_rows = (rows + 0.5 - centre[0]) / half[0]
        offset_cols = (cols + 0.5 - centre[1]) / half[1]
        if self.shape == "ellipse":
            inside = tf.square(offset_rows) + tf.square(offset_cols) <= 1.0
        else:
            inside = (tf.abs(offset_rows) <= 1.0) & (tf.abs(offset_cols) <= 1.0)
        inside = inside[:, :, None]
        return _with_static_shapes(
            image, tf.where(inside, donor, image), tf.cast(inside, tf.float32)
        )


def composite(
    image: tf.Tensor, donor: tf.Tensor, seed: int | tf.Tensor, **options: Any
) -> tuple[tf.Tensor, tf.Tensor]:
    """``Composite(**options)(image, donor, seed)``: ``(guide, mask)``."""
    return Composite(**options)(image, donor, seed)


# Generator name -> its options class (a frozen dataclass; an instance is the generator).
GENERATORS = {
    "stroke_painting": StrokePainting,
    "stroke_edit": StrokeEdit,
    "composite": Composite,
}
