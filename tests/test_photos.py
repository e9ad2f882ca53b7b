"""The bundled 256 px photo guides: regenerated from scratch, in the job's input layout."""

import os

import numpy as np
from PIL import Image

from sdedit_jax.data import guide_inputs, photos

BUNDLED = os.path.join(os.path.dirname(photos.__file__), "..", "assets", "photos_256")


def _pixels(folder, name):
    return np.asarray(Image.open(os.path.join(folder, name)), np.int32)


def test_bundled_guides_are_what_the_builder_writes(tmp_path):
    names = photos.build_photo_guides(str(tmp_path))
    bundled = sorted(f[:-4] for f in os.listdir(BUNDLED) if f.endswith(".png"))
    assert bundled == names
    assert sorted(os.listdir(os.path.join(BUNDLED, "masks"))) == [n + ".png" for n in names]
    for name in names:
        for sub in ("", "masks"):
            fresh = _pixels(os.path.join(tmp_path, sub), name + ".png")
            kept = _pixels(os.path.join(BUNDLED, sub), name + ".png")
            assert fresh.shape == kept.shape
            # TF's float reductions may round differently on another CPU: allow a
            # few borderline pixels, never a different picture.
            changed = fresh != kept
            differing = np.mean(changed.any(axis=-1) if changed.ndim == 3 else changed)
            assert differing < 1e-3, (sub, name, differing)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(BUNDLED) for f in fs)
    assert size < 3 * 2**20


def test_guides_follow_their_task():
    photo = photos.load_photo("coffee")
    assert photo.shape == (256, 256, 3) and photo.dtype == np.uint8
    paint = _pixels(BUNDLED, "paint_coffee.png")
    assert len(np.unique(paint.reshape(-1, 3), axis=0)) <= photos.PAINT_KWARGS["num_colors"]
    assert (_pixels(os.path.join(BUNDLED, "masks"), "paint_coffee.png") == 255).all()
    edit = _pixels(BUNDLED, "edit_coffee.png")
    edit_mask = _pixels(os.path.join(BUNDLED, "masks"), "edit_coffee.png") > 127
    assert 0.02 < edit_mask.mean() < 0.5
    # Outside the stroke mask a stroke edit is the photo itself.
    np.testing.assert_array_equal(edit[~edit_mask], photo[~edit_mask])
    name, source, _, target, _, _ = photos.COMPOSITES[1]
    pasted = _pixels(BUNDLED, name + ".png")
    pasted_mask = _pixels(os.path.join(BUNDLED, "masks"), name + ".png") > 127
    np.testing.assert_array_equal(pasted[~pasted_mask], photos.load_photo(target)[~pasted_mask])
    assert np.any(pasted[pasted_mask] != photos.load_photo(target)[pasted_mask])


def test_the_job_pipeline_reads_every_guide_with_its_mask():
    config = guide_inputs.GuideInputConfig(source="folder", path=BUNDLED, image_size=(256, 256))
    catalog = guide_inputs.build_catalog(config)
    assert len(catalog) == 10
    assert not any(catalog.columns["error"]), catalog.columns["error"]
    stream = guide_inputs.make_guide_dataset(
        config, batch_size_per_host=10, process_index=0, process_count=1
    )
    batch = next(stream.dataset.as_numpy_iterator())
    assert batch["ok"].all(), batch["error"]
    assert batch["guide"].shape == (10, 256, 256, 3)
    assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
