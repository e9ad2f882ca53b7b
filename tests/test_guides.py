"""Synthetic SDEdit guides: eager == tf.data, and each generator's defining property."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from scipy.cluster import vq

from sdedit_jax.data import guides

HEIGHT, WIDTH = 24, 32


def smooth_image(seed: int = 0) -> np.ndarray:
    """A smooth colour image in [-1, 1] (gradients plus two soft blobs)."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    rng = np.random.default_rng(seed)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        centre = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / 0.05)
        channels.append(0.4 * a * rows + 0.4 * b * cols + 0.5 * c * blob)
    return np.clip(np.stack(channels, -1), -1, 1).astype(np.float32)


def run_eager_and_in_dataset(fn, *inputs):
    """``fn`` applied eagerly and inside ``Dataset.map``; both as numpy tuples."""

    def as_tuple(result):
        return tuple(np.asarray(x) for x in (result if isinstance(result, tuple) else (result,)))

    eager = fn(*[tf.constant(x) for x in inputs])
    mapped = next(iter(tf.data.Dataset.from_tensors(tuple(inputs)).map(fn)))
    return as_tuple(eager), as_tuple(mapped)


@pytest.mark.parametrize("name", ["stroke_painting", "stroke_edit", "composite"])
@pytest.mark.slow
def test_eager_equals_tf_data(name):
    image, donor = smooth_image(0), smooth_image(1)
    seed = np.array([3, 11], np.int64)
    fns = {
        "stroke_painting": lambda x, s: guides.stroke_painting(x, s),
        "stroke_edit": lambda x, s: guides.stroke_edit(x, s),
        "composite": lambda x, s: guides.composite(x, tf.constant(donor), s),
    }
    eager, mapped = run_eager_and_in_dataset(fns[name], image, seed)
    for e, m in zip(eager, mapped, strict=True):
        np.testing.assert_array_equal(e, m)
    assert eager[0].shape == image.shape


def test_median_and_blur_match_scipy():
    image = smooth_image(2) + np.random.default_rng(0).normal(0, 0.2, (HEIGHT, WIDTH, 3))
    image = image.astype(np.float32)
    median = guides.median_filter(image, 5).numpy()
    expected = ndimage.median_filter(image, size=(5, 5, 1), mode="mirror")
    np.testing.assert_allclose(median, expected, atol=1e-6)
    blurred = guides.gaussian_blur(image, 1.5).numpy()
    expected = ndimage.gaussian_filter(image, sigma=(1.5, 1.5, 0), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(blurred, expected, atol=1e-5)


@pytest.mark.parametrize("num_colors", [2, 5])
def test_stroke_painting_colours_and_fidelity(num_colors):
    image = smooth_image(3)
    painting = guides.stroke_painting(image, 0, num_colors=num_colors).numpy()
    colours = np.unique(painting.reshape(-1, 3), axis=0)
    assert len(colours) <= num_colors
    # Each pixel takes the palette colour nearest to the smoothed image (the
    # k-means assignment rule), and the palette is about as good a k-means
    # solution as scipy's best of several restarts.
    smooth = guides.gaussian_blur(guides.median_filter(image, 5), 1.0).numpy()
    distances = ((smooth[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    nearest = colours[distances.argmin(-1)]
    np.testing.assert_allclose(painting, nearest, atol=1e-6)
    pixels = smooth.reshape(-1, 3).astype(np.float64)
    reference, _ = vq.kmeans(pixels, num_colors, iter=10, seed=0)
    reference_error = ((pixels[:, None] - reference[None]) ** 2).sum(-1).min(-1).mean()
    error = ((painting - smooth) ** 2).sum(-1).mean()
    assert error <= 1.1 * reference_error
    assert np.abs(painting - smooth).mean() < 0.1


def test_stroke_painting_recovers_a_flat_colour_image():
    image = np.full((HEIGHT, WIDTH, 3), -0.8, np.float32)
    image[:12, :, :] = [0.5, -0.2, 0.9]
    image[12:, 20:, :] = [0.1, 0.7, -0.5]
    painting = guides.stroke_painting(image, 5, num_colors=3, median_size=1, blur_sigma=0.0)
    np.testing.assert_allclose(painting.numpy(), image, atol=1e-5)


def test_stroke_painting_is_a_function_of_the_seed():
    image = smooth_image(4)
    first = guides.stroke_painting(image, 7, num_colors=4).numpy()
    again = guides.stroke_painting(image, 7, num_colors=4).numpy()
    np.testing.assert_array_equal(first, again)


def test_stroke_edit_changes_only_the_masked_strokes():
    image = smooth_image(5)
    guide, mask = (
        x.numpy() for x in guides.stroke_edit(image, 9, num_strokes=3, mask_dilation=0.0)
    )
    changed = np.any(guide != image, axis=-1)
    # With no dilation the mask is exactly the painted region (random stroke
    # colours never equal the image pixel they cover).
    np.testing.assert_array_equal(mask[..., 0] == 1.0, changed)
    assert 0 < changed.mean() < 1
    assert len(np.unique(guide[changed], axis=0)) <= 3
    _, dilated = (x.numpy() for x in guides.stroke_edit(image, 9, num_strokes=3, mask_dilation=3.0))
    assert np.all(dilated >= mask) and dilated.sum() > mask.sum()
    other, _ = guides.stroke_edit(image, 10, num_strokes=3)
    assert not np.array_equal(other.numpy(), guide)


@pytest.mark.parametrize("shape", ["ellipse", "rectangle"])
def test_composite_pastes_donor_inside_mask(shape):
    image, donor = smooth_image(6), smooth_image(7)
    guide, mask = (
        x.numpy() for x in guides.composite(image, donor, 4, shape=shape, size_range=(0.4, 0.6))
    )
    inside = mask[..., 0] == 1.0
    assert set(np.unique(mask)) == {0.0, 1.0}
    np.testing.assert_array_equal(guide[inside], donor[inside])
    np.testing.assert_array_equal(guide[~inside], image[~inside])
    rows, cols = np.nonzero(inside)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    # A rectangle fills its bounding box; an ellipse covers about pi/4 of it.
    expected_fill = 1.0 if shape == "rectangle" else np.pi / 4
    assert inside.sum() / box == pytest.approx(expected_fill, abs=0.08)
    assert 0.4 * 0.4 * 0.7 < box / inside.size < 0.6 * 0.6 * 1.3


def test_bad_arguments_fail_clearly():
    image = smooth_image(0)
    with pytest.raises(ValueError, match="seed"):
        guides.stroke_painting(image, np.zeros([3], np.int64))
    with pytest.raises(ValueError, match="shape"):
        guides.composite(image, image, 0, shape="star")
    with pytest.raises(ValueError, match="image"):
        guides.stroke_edit(image[0], 0)
