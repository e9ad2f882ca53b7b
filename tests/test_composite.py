"""The compositing-guide builder against hand-computed pixels, and its one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdedit_jax.data import compositing as composite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ramp(height, width):
    """uint8 image whose pixel (y, x) is (10*y + x, 100 + x, 200 - y): every pixel distinct."""
    y, x = np.mgrid[:height, :width]
    return np.stack([10 * y + x, 100 + x, 200 - y], axis=-1).astype(np.uint8)


def test_box_at_scale_one_copies_the_box_exactly():
    source, target = _ramp(6, 8), np.zeros((10, 12, 3), np.uint8)
    region = composite.box_region(source.shape, (1, 2, 4, 5))  # columns 1..3, rows 2..4
    guide, mask = composite.paste(source, region, target, at=(5, 3))
    expected = target.copy()
    expected[3:6, 5:8] = source[2:5, 1:4]
    np.testing.assert_array_equal(guide, expected)
    expected_mask = np.zeros((10, 12), bool)
    expected_mask[3:6, 5:8] = True
    np.testing.assert_array_equal(mask, expected_mask)


def test_half_scale_averages_each_two_by_two_block():
    source = np.zeros((4, 4, 3), np.uint8)
    source[..., 0] = [[0, 4, 10, 10], [8, 12, 20, 30], [1, 1, 50, 50], [1, 1, 50, 54]]
    target = np.full((5, 5, 3), 255, np.uint8)
    region = np.ones((4, 4), bool)
    guide, mask = composite.paste(source, region, target, at=(2, 1), scale=0.5)
    # Block means: (0+4+8+12)/4 = 6, (10+10+20+30)/4 = 17.5 -> 18, 1, (50+50+50+54)/4 = 51.
    np.testing.assert_array_equal(guide[1:3, 2:4, 0], [[6, 18], [1, 51]])
    np.testing.assert_array_equal(guide[1:3, 2:4, 1:], 0)
    assert mask.sum() == 4 and mask[1:3, 2:4].all()
    untouched = np.ones((5, 5), bool)
    untouched[1:3, 2:4] = False
    assert (guide[untouched] == 255).all()


def test_double_scale_of_a_flat_region_doubles_its_extent():
    source = np.zeros((8, 8, 3), np.uint8)
    source[2:5, 3:6] = (40, 80, 120)
    region = composite.box_region(source.shape, (3, 2, 6, 5))
    guide, mask = composite.paste(source, region, np.zeros((20, 20, 3), np.uint8), (4, 7), 2.0)
    expected_mask = np.zeros((20, 20), bool)
    expected_mask[7:13, 4:10] = True  # 3x3 -> 6x6 at x=4, y=7
    np.testing.assert_array_equal(mask, expected_mask)
    assert (guide[expected_mask] == (40, 80, 120)).all()  # bicubic keeps a constant constant
    assert (guide[~expected_mask] == 0).all()


def test_mask_region_pastes_only_the_masked_pixels():
    source = _ramp(5, 5)
    region = np.zeros((5, 5), bool)
    region[1, 1:4] = True  # an L: top row of three and a column down the left
    region[2:4, 1] = True
    target = np.full((6, 6, 3), 7, np.uint8)
    guide, mask = composite.paste(source, region, target, at=(0, 2))
    # Bounding box rows 1..3, columns 1..3 lands at rows 2..4, columns 0..2.
    expected = target.copy()
    expected[2, 0:3] = source[1, 1:4]
    expected[3:5, 0] = source[2:4, 1]
    np.testing.assert_array_equal(guide, expected)
    np.testing.assert_array_equal(mask, np.all(expected != 7, axis=-1))


def test_dilation_grows_the_mask_by_a_disk():
    source = np.full((1, 1, 3), 9, np.uint8)
    region = np.ones((1, 1), bool)
    target = np.zeros((9, 9, 3), np.uint8)
    for radius, pixels in ((0, 1), (1, 5), (2, 13)):
        guide, mask = composite.paste(source, region, target, (4, 4), dilate=radius)
        y, x = np.nonzero(mask)
        assert len(y) == pixels
        assert ((y - 4) ** 2 + (x - 4) ** 2 <= radius**2).all()
        assert (guide != 0).sum() == 3  # only the pasted pixel changes the guide
    # Dilation stops at the border of the target.
    _, mask = composite.paste(source, region, target, (0, 0), dilate=1)
    assert mask.sum() == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"at": (10, 0)}, r"--at: the 3x3 region at 10,0 does not fit in the target \(12x10\)"),
        ({"at": (-1, 0)}, r"--at: the 3x3 region at -1,0"),
        ({"scale": 0.0}, r"--scale: must be a positive number, got 0.0"),
        ({"scale": 0.1}, r"--scale: 0.1 shrinks the 3x3 region to nothing"),
        ({"dilate": -2}, r"--dilate: must be >= 0 pixels, got -2"),
    ],
)
def test_bad_paste_arguments_name_the_argument(kwargs, match):
    source = _ramp(6, 8)
    region = composite.box_region(source.shape, (1, 2, 4, 5))
    args = {"at": (0, 0), **kwargs}
    with pytest.raises(composite.CompositeError, match=match):
        composite.paste(source, region, np.zeros((10, 12, 3), np.uint8), **args)


def test_bad_regions_are_refused():
    source = _ramp(6, 8)
    with pytest.raises(composite.CompositeError, match=r"--box: 4,2,4,5 is empty or outside"):
        composite.box_region(source.shape, (4, 2, 4, 5))
    with pytest.raises(composite.CompositeError, match=r"--box: 0,0,9,5 .* x1 <= 8"):
        composite.box_region(source.shape, (0, 0, 9, 5))
    with pytest.raises(composite.CompositeError, match=r"--source_mask: the region is empty"):
        composite.paste(source, np.zeros((6, 8), bool), source, (0, 0))
    with pytest.raises(composite.CompositeError, match=r"--source_mask: size 7x6 differs"):
        composite.paste(source, np.ones((6, 7), bool), source, (0, 0))


def test_unreadable_files_are_named(tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(composite.CompositeError, match=r"--source \(.*nope.png\): file not found"):
        composite.read_rgb(missing, "--source")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(composite.CompositeError, match=r"--target \(.*junk.png\): not a readable"):
        composite.read_rgb(str(junk), "--target")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with pytest.raises(composite.CompositeError, match=r"--source \(.*alpha.png\): has transp"):
        composite.read_rgb(str(tmp_path / "alpha.png"), "--source")
    Image.fromarray(_ramp(4, 4)).save(tmp_path / "colour.png")
    with pytest.raises(composite.CompositeError, match=r"--source_mask \(.*\): colour mask"):
        composite.read_mask(str(tmp_path / "colour.png"), "--source_mask")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdedit_jax.composite", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_command_writes_the_job_layout_and_fails_in_one_line(tmp_path):
    source, target = _ramp(6, 8), np.full((10, 12, 3), 30, np.uint8)
    Image.fromarray(source).save(tmp_path / "a.png")
    Image.fromarray(target).save(tmp_path / "b.png")
    mask = np.zeros((6, 8), np.uint8)
    mask[2:5, 1:4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "guides"
    done = _cli(
        "--source",
        str(tmp_path / "a.png"),
        "--target",
        str(tmp_path / "b.png"),
        "--source_mask",
        str(tmp_path / "m.png"),
        "--at",
        "5,3",
        "--dilate",
        "1",
        "--out",
        str(out),
        "--name",
        "foo",
    )
    assert done.returncode == 0, done.stderr
    guide = np.asarray(Image.open(out / "foo.png"))
    written_mask = np.asarray(Image.open(out / "masks" / "foo.png"))
    expected = target.copy()
    expected[3:6, 5:8] = source[2:5, 1:4]
    np.testing.assert_array_equal(guide, expected)
    pasted = np.zeros((10, 12), bool)
    pasted[3:6, 5:8] = True
    np.testing.assert_array_equal(written_mask, composite.disk_dilate(pasted, 1) * 255)
    assert written_mask.sum() // 255 == 9 + 4 * 3  # the 3x3 square plus one ring of 4 sides

    bad = _cli(
        "--source",
        str(tmp_path / "a.png"),
        "--target",
        str(tmp_path / "b.png"),
        "--box",
        "1,2,4",
        "--out",
        str(tmp_path / "none"),
        "--name",
        "bar",
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --box: expected 4 comma-separated integers, got '1,2,4'"
    assert not (tmp_path / "none").exists()
    again = _cli(
        "--source",
        str(tmp_path / "a.png"),
        "--target",
        str(tmp_path / "b.png"),
        "--box",
        "1,2,4,5",
        "--out",
        str(out),
        "--name",
        "foo",
    )
    assert again.returncode == 2 and "--name: " in again.stderr and "exists" in again.stderr
    both = _cli(
        "--source",
        str(tmp_path / "a.png"),
        "--target",
        str(tmp_path / "b.png"),
        "--box",
        "1,2,4,5",
        "--source_mask",
        str(tmp_path / "m.png"),
        "--out",
        str(out),
        "--name",
        "x",
    )
    assert both.stderr.strip() == "error: --source_mask / --box: give exactly one of them"
