"""Tests for the offline data sets and the tf.data training input.

Reference images are decoded with Pillow, independently of the tf.io decoders
the pipeline uses; Fashion-MNIST is checked against facts published with it.
"""

import gzip
import json
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from sdedit_jax.data import emoji, fashion_mnist, images, records
from sdedit_jax.training import input_pipeline

NUM_NOISE_IMAGES = 24
NOISE_SIZE = 16


def _noise_images() -> np.ndarray:
    """Distinct random RGB images; random pixels make every image differ from its mirror."""
    rng = np.random.default_rng(1234)
    return rng.integers(0, 256, (NUM_NOISE_IMAGES, NOISE_SIZE, NOISE_SIZE, 3), dtype=np.uint8)


class TinyNoiseImages(tfds.core.GeneratorBasedBuilder):
    """A locally generated TFDS data set holding the same images as the noise folder."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"image": tfds.features.Image(shape=(NOISE_SIZE, NOISE_SIZE, 3))}
        # Built directly: metadata lookup needs a package directory, which tests/ is not.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index, image in enumerate(_noise_images()):
            yield index, {"image": image}


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> str:
    """The noise images as PNGs in two subfolders, next to a file that is not an image."""
    root = tmp_path_factory.mktemp("noise")
    for index, image in enumerate(_noise_images()):
        subfolder = root / ("a" if index % 2 else "b")
        subfolder.mkdir(exist_ok=True)
        Image.fromarray(image).save(subfolder / f"{index:03d}.png")
    (root / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def tfrecord_glob(noise_folder, tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("records") / "noise")
    records.write_tfrecords(noise_folder, prefix, num_shards=3)
    return prefix + "-*"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyNoiseImages(data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def source_configs(noise_folder, tfrecord_glob, tfds_dir) -> dict:
    """Configs of three sources holding the same 24 images, flips off, values in [0, 1]."""
    common = {
        "image_size": NOISE_SIZE,
        "random_flip": False,
        "value_range": "0_1",
        "shuffle_window": NUM_NOISE_IMAGES,
    }
    return {
        "folder": {"source": "folder", "path": noise_folder, **common},
        "tfrecord": {"source": "tfrecord", "path": tfrecord_glob, **common},
        "tfds": {
            "source": "tfds",
            "name": TinyNoiseImages.name,
            "data_dir": tfds_dir,
            **common,
        },
    }


def _examples(fields: dict, count: int, seed: int = 0, batch_size: int = 8, **kwargs) -> np.ndarray:
    """The first `count` examples as uint8, undoing the [0, 1] scaling exactly."""
    config = input_pipeline.default_config()
    config.update(fields)
    ds = input_pipeline.train_dataset(config, batch_size, seed, **kwargs)
    batches = input_pipeline.numpy_batches(ds)
    stacked = np.concatenate([next(batches) for _ in range(-(-count // batch_size))])[:count]
    if config.value_range == "0_1":
        return np.rint(stacked * 255.0).astype(np.uint8)
    return stacked


def _sorted_bytes(array: np.ndarray) -> list[bytes]:
    return sorted(image.tobytes() for image in array)


def test_real_font_has_over_1000_visible_codepoints():
    codepoints = emoji.emoji_codepoints()
    assert len(codepoints) > 1000
    assert 0x1F600 in codepoints  # GRINNING FACE
    assert 0x200D not in codepoints  # ZERO WIDTH JOINER draws nothing
    held_out = np.mean([emoji.is_held_out(emoji.codepoint_name(cp)) for cp in codepoints])
    assert 0.07 < held_out < 0.13


def test_grinning_face_is_yellow_on_white():
    image = np.asarray(emoji.render_emoji(emoji.load_font(), 0x1F600, 32)).astype(int)
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image[0, 0], [255, 255, 255])
    red, green, blue = image[8:24, 8:24].reshape(-1, 3).mean(axis=0)
    assert red > 180 and green > 140 and blue < 110


def test_build_emoji_folder_small_is_complete_deterministic_and_idempotent(tmp_path):
    manifest = emoji.build_emoji_folder(str(tmp_path / "a"), size=16, limit=20)
    assert sum(manifest["counts"].values()) + len(manifest["skipped_blank"]) == 20
    expected = emoji.emoji_codepoints()[:20]
    for codepoint in expected:
        name = emoji.codepoint_name(codepoint)
        split = "test" if emoji.is_held_out(name) else "train"
        with Image.open(tmp_path / "a" / split / f"{name}.png") as image:
            assert (image.mode, image.size) == ("RGB", (16, 16))

    again = emoji.build_emoji_folder(str(tmp_path / "b"), size=16, limit=20)
    for split in ("train", "test"):
        names = sorted(os.listdir(tmp_path / "a" / split))
        assert names == sorted(os.listdir(tmp_path / "b" / split))
        for name in names:
            first = (tmp_path / "a" / split / name).read_bytes()
            assert first == (tmp_path / "b" / split / name).read_bytes()
    assert again == manifest

    marker = tmp_path / "a" / emoji.MANIFEST_NAME
    written_at = marker.stat().st_mtime_ns
    assert emoji.build_emoji_folder(str(tmp_path / "a"), size=16, limit=20) == manifest
    assert marker.stat().st_mtime_ns == written_at
    with pytest.raises(ValueError, match="manifest.json"):
        emoji.build_emoji_folder(str(tmp_path / "a"), size=32, limit=20)


def test_build_emoji_folder_refuses_interrupted_build(tmp_path):
    (tmp_path / "partial" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="partial"):
        emoji.build_emoji_folder(str(tmp_path / "partial"), size=16, limit=2)


def test_emoji_source_builds_full_folder_and_yields_batches(tmp_path):
    config = input_pipeline.default_config()
    config.update({"source": "emoji", "path": str(tmp_path / "emoji"), "image_size": 16})
    batch = next(input_pipeline.numpy_batches(input_pipeline.train_dataset(config, 4, seed=0)))
    assert batch.shape == (4, 16, 16, 3) and batch.dtype == np.float32
    manifest = json.loads((tmp_path / "emoji" / emoji.MANIFEST_NAME).read_text())
    assert manifest["counts"]["train"] > 1000
    assert len(os.listdir(tmp_path / "emoji" / "train")) == manifest["counts"]["train"]


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def test_parse_idx_round_trip_and_corruption(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fashion_mnist.parse_idx(_idx_bytes(array), "x"), array)
    with pytest.raises(ValueError, match="bad.idx"):
        fashion_mnist.parse_idx(_idx_bytes(array)[:-1], "bad.idx")
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(_idx_bytes(array))[:-8])
    with pytest.raises(ValueError, match="broken.gz"):
        fashion_mnist.read_idx_gz(str(broken))
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        fashion_mnist.read_idx_gz(str(tmp_path / "missing.gz"))


def test_fashion_mnist_matches_published_facts():
    train_images, train_labels = fashion_mnist.load("train")
    test_images, test_labels = fashion_mnist.load("test")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28)
    # Both splits are balanced over the 10 classes.
    np.testing.assert_array_equal(np.bincount(train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test_labels), np.full(10, 1000))
    padded = fashion_mnist.pad_to(test_images[:5])
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], test_images[:5])
    assert padded.shape == (5, 32, 32) and not padded[:, :2].any() and not padded[:, :, 30:].any()
    rgb = fashion_mnist.load_images("test", channels=3)
    np.testing.assert_array_equal(rgb[:5], np.repeat(padded[..., None], 3, axis=-1))


def test_fashion_mnist_source_pads_with_background():
    batch = _examples({"source": "fashion_mnist", "random_flip": False}, 8)
    assert batch.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(batch[:, :2], -1.0)
    np.testing.assert_array_equal(batch[..., 0], batch[..., 2])


@pytest.mark.parametrize("source", ["folder", "tfrecord", "tfds"])
def test_sources_yield_exactly_the_folder_images_each_epoch(source, source_configs, noise_folder):
    reference = images.load_image_folder(noise_folder)
    assert len(reference) == NUM_NOISE_IMAGES
    two_epochs = _examples(source_configs[source], 2 * NUM_NOISE_IMAGES)
    for epoch in (two_epochs[:NUM_NOISE_IMAGES], two_epochs[NUM_NOISE_IMAGES:]):
        assert _sorted_bytes(epoch) == _sorted_bytes(reference)
    assert not np.array_equal(two_epochs[:NUM_NOISE_IMAGES], two_epochs[NUM_NOISE_IMAGES:])


@pytest.mark.parametrize("source", ["folder", "tfrecord"])
def test_same_seed_same_batches_other_seed_differs(source, source_configs):
    fields = {**source_configs[source], "random_flip": True, "value_range": "-1_1"}
    first = _examples(fields, 32, seed=7)
    np.testing.assert_array_equal(first, _examples(fields, 32, seed=7))
    assert not np.array_equal(first, _examples(fields, 32, seed=8))


def test_values_span_the_configured_range(source_configs):
    fields = source_configs["folder"]
    unit = _examples({**fields, "value_range": "0_1"}, 16, seed=3, batch_size=16)
    symmetric = _examples({**fields, "value_range": "-1_1"}, 16, seed=3, batch_size=16)
    assert symmetric.min() == -1.0 and symmetric.max() == 1.0
    np.testing.assert_allclose(symmetric, unit.astype(np.float32) / 127.5 - 1.0, atol=1e-6)


def test_flips_mirror_about_half_of_the_examples(source_configs):
    count = 4 * NUM_NOISE_IMAGES
    plain = _examples(source_configs["folder"], count, seed=5)
    flipped = _examples({**source_configs["folder"], "random_flip": True}, count, seed=5)
    is_same = np.all(plain == flipped, axis=(1, 2, 3))
    is_mirror = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
    assert np.all(is_same ^ is_mirror)
    assert 0.25 < is_mirror.mean() < 0.75


@pytest.mark.parametrize("source", ["folder", "tfrecord"])
def test_process_shards_are_disjoint_and_cover_the_data(source, source_configs, noise_folder):
    # 24 examples span at least one epoch of either shard (12 + 12 files, 16 + 8 records).
    per_process = [
        _examples(source_configs[source], NUM_NOISE_IMAGES, process_index=index, process_count=2)
        for index in (0, 1)
    ]
    seen = [set(_sorted_bytes(shard)) for shard in per_process]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(_sorted_bytes(images.load_image_folder(noise_folder)))


def test_non_square_images_are_cropped_and_resized(tmp_path):
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "wide.png")
    Image.new("L", (24, 40), 77).save(tmp_path / "tall.png")
    fields = {"source": "folder", "path": str(tmp_path), "image_size": 8}
    batch = _examples({**fields, "random_flip": False, "value_range": "0_1"}, 2, batch_size=2)
    assert batch.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(batch, np.broadcast_to(batch[:, :1, :1], batch.shape))
    assert sorted(tuple(image[0, 0].tolist()) for image in batch) == [(10, 200, 30), (77, 77, 77)]


def test_bad_inputs_raise_errors_naming_them(tmp_path, source_configs):
    with pytest.raises(ValueError, match="image_sise"):
        _examples({"source": "folder", "path": str(tmp_path), "image_sise": 8}, 1)
    with pytest.raises(ValueError, match="value_range"):
        _examples({**source_configs["folder"], "value_range": "0_255"}, 1)
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="fake.png"):
        _examples({"source": "folder", "path": str(tmp_path)}, 1, batch_size=1)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        _examples({"source": "tfrecord", "path": str(tmp_path / "nothing-*")}, 1)
