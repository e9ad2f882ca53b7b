"""Guide input pipeline: sources agree, sharding partitions, padding, bad inputs become failures."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from sdedit_jax.data import guide_inputs, guides

SIZE = 8
rng = np.random.default_rng(0)


def random_rgb(height=SIZE, width=SIZE) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_mask(height=SIZE, width=SIZE) -> np.ndarray:
    return (rng.integers(0, 2, (height, width)) * 255).astype(np.uint8)


def save(root, rel, pixels, **kwargs) -> str:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if rel.endswith(".npy"):
        np.save(path, pixels)
    else:
        Image.fromarray(pixels, **kwargs).save(path)
    return path


def collect(config, *, batch_size=3, process_index=0, process_count=1, **kwargs):
    """All rows of one host's stream as a dict id -> row, plus the stream and raw batches."""
    stream = guide_inputs.make_guide_dataset(
        config,
        batch_size_per_host=batch_size,
        process_index=process_index,
        process_count=process_count,
        **kwargs,
    )
    batches = list(stream.dataset.as_numpy_iterator())
    rows = {}
    for batch in batches:
        for i in np.flatnonzero(batch["valid"]):
            row = {k: v[i] for k, v in batch.items()}
            row["error"] = row["error"].decode()
            rows[row["id"].decode()] = row
    return rows, stream, batches


def expected_guide(path_or_array) -> np.ndarray:
    """Independent decoding: PIL to RGB, then [0, 255] -> [-1, 1]; npy as stored."""
    if isinstance(path_or_array, np.ndarray):
        return path_or_array
    if path_or_array.endswith(".npy"):
        return np.load(path_or_array)
    return np.asarray(Image.open(path_or_array).convert("RGB"), np.float32) / 127.5 - 1.0


def expected_mask(path) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)[..., None]
    return np.asarray(Image.open(path), np.float32)[..., None] / 255.0


@pytest.fixture
def good_folder(tmp_path):
    """Guides in four formats, masks in masks/; returns (root, {id: (guide, mask)})."""
    root = str(tmp_path / "guides")
    npy_guide = rng.uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    files = {
        "a.png": (save(root, "a.png", random_rgb()), save(root, "masks/a.png", random_mask())),
        "b.jpg": (save(root, "b.jpg", random_rgb()), save(root, "masks/b.png", random_mask())),
        "c.png": (
            save(root, "c.png", random_rgb()[..., 0], mode="L"),
            save(root, "masks/c.npy", rng.uniform(0, 1, (SIZE, SIZE)).astype(np.float32)),
        ),
        "sub/d.npy": (
            save(root, "sub/d.npy", npy_guide),
            save(root, "masks/sub/d.png", random_mask()),
        ),
    }
    return root, files


def tfrecord_from_files(directory, files, shards=2) -> str:
    """Writes ``files`` (id -> (guide path, mask path)) as TFRecord shards with the same bytes."""
    os.makedirs(directory, exist_ok=True)
    items = sorted(files.items())
    for shard in range(shards):
        with tf.io.TFRecordWriter(os.path.join(directory, f"part-{shard}.tfrecord")) as writer:
            for example_id, (guide, mask) in items[shard::shards]:
                with open(guide, "rb") as g, open(mask, "rb") as m:
                    writer.write(guide_inputs.tf_example(g.read(), id=example_id, mask=m.read()))
    return os.path.join(directory, "*.tfrecord")


def test_folder_tfrecord_and_manifests_give_the_same_guides(good_folder, tmp_path):
    root, files = good_folder
    base = {"image_size": SIZE}
    # Manifests live beside the folder; their relative paths resolve against it.
    entries = [
        (i, os.path.relpath(g, tmp_path), os.path.relpath(m, tmp_path))
        for i, (g, m) in files.items()
    ]
    jsonl, csv_path = str(tmp_path / "list.jsonl"), str(tmp_path / "list.csv")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"id": i, "path": g, "mask": m}) + "\n" for i, g, m in entries)
    with open(csv_path, "w") as f:
        f.write("id,path,mask\n" + "".join(f"{i},{g},{m}\n" for i, g, m in entries))
    sources = {
        "folder": dict(base, source="folder", path=root),
        "tfrecord": dict(
            base, source="tfrecord", path=tfrecord_from_files(str(tmp_path / "records"), files)
        ),
        "jsonl": dict(base, source="manifest", path=jsonl),
        "csv": dict(base, source="manifest", path=csv_path),
    }
    for name, config in sources.items():
        rows, _, _ = collect(config)
        assert sorted(rows) == sorted(files), name
        for example_id, (guide_path, mask_path) in files.items():
            row = rows[example_id]
            assert row["ok"] and row["error"] == "", (name, row["error"])
            truth = expected_guide(guide_path)
            truth = np.repeat(truth, 3, -1) if truth.shape[-1] == 1 else truth
            np.testing.assert_allclose(row["guide"], truth, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(row["mask"], expected_mask(mask_path), atol=1e-6)
            assert row["t0"] == np.float32(0.5) and row["seed"] == 0


def test_no_mask_folder_means_all_ones_and_grayscale_becomes_rgb(tmp_path):
    root = str(tmp_path)
    gray = random_rgb()[..., 0]
    save(root, "g.png", gray, mode="L")
    rows, stream, _ = collect({"source": "folder", "path": root, "image_size": SIZE})
    row = rows["g.png"]
    assert row["ok"]
    np.testing.assert_array_equal(row["mask"], np.ones((SIZE, SIZE, 1), np.float32))
    for channel in range(3):
        np.testing.assert_allclose(row["guide"][..., channel], gray / 127.5 - 1.0, atol=1e-6)
    assert stream.num_steps == 1 and stream.local_examples == 1


def test_resize_only_when_configured(tmp_path):
    root = str(tmp_path)
    save(root, "big.png", np.full((2 * SIZE, 2 * SIZE, 3), 200, np.uint8))
    blocks = np.kron(random_mask(SIZE, SIZE), np.ones((2, 2), np.uint8))
    save(root, "masks/big.png", blocks)
    config = {"source": "folder", "path": root, "image_size": SIZE}
    rows, _, _ = collect(config)
    assert "does not match image_size 8x8" in rows["big.png"]["error"]
    rows, _, _ = collect(dict(config, resize=True))
    row = rows["big.png"]
    assert row["ok"], row["error"]
    np.testing.assert_allclose(row["guide"], np.full((SIZE, SIZE, 3), 200 / 127.5 - 1), atol=1e-5)
    # Nearest-neighbour downsampling of 2x2 blocks returns the original blocks.
    np.testing.assert_array_equal(row["mask"][..., 0], blocks[::2, ::2] / 255.0)


def test_host_sharding_partitions_and_pads(tmp_path):
    root = str(tmp_path)
    ids = [f"img{i:02d}.png" for i in range(11)]
    for example_id in ids:
        save(root, example_id, random_rgb())
    config = {"source": "folder", "path": root, "image_size": SIZE}

    def run(completed=frozenset(), num_steps=None):
        per_host, steps = [], set()
        for host in range(3):
            rows, stream, batches = collect(
                config,
                batch_size=2,
                process_index=host,
                process_count=3,
                completed=completed,
                num_steps=num_steps,
            )
            assert len(batches) == stream.num_steps
            steps.add(stream.num_steps)
            for batch in batches:
                padding = ~batch["valid"]
                assert not batch["ok"][padding].any()
                assert (batch["index"][padding] == -1).all()
                assert (batch["id"][padding] == b"").all()
            # Example i of the canonical (sorted) order belongs to host i % 3,
            # and each host sees its examples in that order.
            assert all(ids.index(i) % 3 == host for i in rows)
            assert list(rows) == sorted(rows)
            assert stream.local_examples == len(rows)
            per_host.append(set(rows))
        assert len(steps) == 1
        return per_host, steps.pop()

    per_host, steps = run()
    assert set().union(*per_host) == set(ids)
    assert sum(len(h) for h in per_host) == len(ids)
    assert steps == 2  # 4, 4 and 3 examples in batches of 2

    completed = {ids[0], ids[3], ids[6], ids[1]}
    per_host, steps = run(completed)
    assert set().union(*per_host) == set(ids) - completed
    assert sum(len(h) for h in per_host) == len(ids) - len(completed)
    assert [len(h) for h in per_host] == [1, 3, 3] and steps == 2

    per_host, steps = run(num_steps=4)
    assert steps == 4 and set().union(*per_host) == set(ids)
    with pytest.raises(ValueError, match="num_steps"):
        run(num_steps=1)


def test_bad_folder_inputs_become_exactly_the_expected_failures(tmp_path):
    root = str(tmp_path)
    good = {"good1.png": random_rgb(), "good2.png": random_rgb()}
    for name, pixels in good.items():
        save(root, name, pixels)
        save(root, f"masks/{os.path.splitext(name)[0]}.png", random_mask())
    png = open(save(root, "truncated.png", random_rgb()), "rb").read()
    with open(os.path.join(root, "truncated.png"), "wb") as f:
        f.write(png[: len(png) // 2])
    with open(os.path.join(root, "random.png"), "wb") as f:
        f.write(rng.bytes(300))
    save(root, "two_channel.png", rng.integers(0, 256, (SIZE, SIZE, 2), dtype=np.uint8))
    save(root, "wrong_size.png", random_rgb(SIZE + 4, SIZE))
    save(root, "masks/wrong_size.png", random_mask(SIZE + 4, SIZE))
    save(root, "mask_mismatch.png", random_rgb())
    save(root, "masks/mask_mismatch.png", random_mask(SIZE - 1, SIZE))
    save(root, "no_mask.png", random_rgb())
    nan_guide = rng.uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    nan_guide[2, 3, 1] = np.nan
    save(root, "nan.npy", nan_guide)
    save(root, "colour_mask.png", random_rgb())
    save(root, "masks/colour_mask.png", random_rgb())
    transparent = np.concatenate([random_rgb(), np.full((SIZE, SIZE, 1), 7, np.uint8)], -1)
    save(root, "transparent.png", transparent)
    save(root, "huge.png", random_rgb(40, 40))
    with open(os.path.join(root, "notes.md"), "w") as f:
        f.write("not an image")
    save(root, "masks/orphan.png", random_mask())
    for name in ("truncated", "random", "two_channel", "nan", "transparent", "huge"):
        save(root, f"masks/{name}.png", random_mask())

    config = {"source": "folder", "path": root, "image_size": SIZE, "max_pixels": 1000}
    rows, stream, _ = collect(config, batch_size=4)
    m = os.path.join(root, "masks")
    expected = {
        "truncated.png": f"guide ({root}/truncated.png): corrupt or truncated image data",
        "random.png": f"guide ({root}/random.png): not a decodable image",
        "two_channel.png": f"guide ({root}/two_channel.png): 2 channels (mode LA)",
        "wrong_size.png": f"guide ({root}/wrong_size.png): size 12x8 does not match image_size 8x8",
        "mask_mismatch.png": f"mask ({m}/mask_mismatch.png): size 7x8 does not match guide 8x8",
        "no_mask.png": f"mask ({m}/no_mask{{.png,.npy}}): file not found",
        "nan.npy": f"guide ({root}/nan.npy): 1 non-finite values",
        "colour_mask.png": f"mask ({m}/colour_mask.png): RGB channels differ",
        "transparent.png": f"guide ({root}/transparent.png): has transparent pixels",
        "huge.png": f"guide ({root}/huge.png): size 40x40 exceeds max_pixels=1000",
        "notes.md": f"guide ({root}/notes.md): unsupported extension '.md'",
        "masks/orphan.png": f"mask ({m}/orphan.png): no guide image named orphan.*",
    }
    failed = {i: r["error"] for i, r in rows.items() if not r["ok"]}
    assert sorted(failed) == sorted(expected)
    for example_id, reason in expected.items():
        assert failed[example_id].startswith(reason), (example_id, failed[example_id])
        row = rows[example_id]
        assert not row["guide"].any() and not row["mask"].any() and row["t0"] == np.float32(0.5)
    assert stream.num_examples == len(good) + len(expected) == len(rows)
    for name, pixels in good.items():
        assert rows[name]["ok"]
        np.testing.assert_allclose(rows[name]["guide"], pixels / 127.5 - 1.0, atol=1e-6)


def test_bad_tfrecords_become_failures(tmp_path):
    good_png = open(save(str(tmp_path), "good.png", random_rgb()), "rb").read()
    nan_guide = np.zeros((SIZE, SIZE, 3), np.float32)
    nan_guide[0, 0, 0] = np.inf
    buffer = tmp_path / "nan.npy"
    np.save(buffer, nan_guide)
    records = [
        guide_inputs.tf_example(good_png, id="ok", t0=0.25, seed=9),
        guide_inputs.tf_example(buffer.read_bytes(), id="inf_npy"),
        guide_inputs.tf_example(good_png, id="bad_t0", t0=float("nan")),
        b"definitely not a proto",
        guide_inputs.tf_example(good_png),
    ]
    shard = str(tmp_path / "a.tfrecord")
    with tf.io.TFRecordWriter(shard) as writer:
        for record in records:
            writer.write(record)
    cut = str(tmp_path / "b.tfrecord")
    with tf.io.TFRecordWriter(cut) as writer:
        writer.write(guide_inputs.tf_example(good_png, id="before_cut"))
        writer.write(guide_inputs.tf_example(good_png, id="cut"))
    data = open(cut, "rb").read()
    with open(cut, "wb") as f:
        f.write(data[:-20])
    config = {"source": "tfrecord", "path": str(tmp_path / "*.tfrecord"), "image_size": SIZE}
    rows, _, _ = collect(config)
    assert rows["ok"]["ok"] and rows["ok"]["t0"] == np.float32(0.25) and rows["ok"]["seed"] == 9
    assert rows["a.tfrecord:4"]["ok"]  # no id feature: shard name and record index
    assert rows["before_cut"]["ok"]
    failures = {i: r["error"] for i, r in rows.items() if not r["ok"]}
    assert sorted(failures) == ["a.tfrecord:3", "b.tfrecord:1", "bad_t0", "inf_npy"]
    assert failures["inf_npy"] == f"guide ({shard}#1): 1 non-finite values"
    assert failures["bad_t0"].startswith(f"tfrecord ({shard}#2): feature 't0': nan is not in")
    assert failures["a.tfrecord:3"].startswith(f"tfrecord ({shard}#3): not a tf.train.Example")
    assert failures["b.tfrecord:1"].startswith(
        f"tfrecord ({cut}): record 1 and all later records of this shard are unreadable"
    )


def test_bad_manifest_rows_become_failures(tmp_path):
    root = str(tmp_path)
    save(root, "img/a.png", random_rgb())
    save(root, "img/b.png", random_rgb())
    lines = [
        json.dumps({"path": "img/a.png", "t0": 0.3, "seed": 4}),
        "{not json",
        json.dumps({"path": "img/b.png", "tO": 0.3}),
        json.dumps({"path": "img/b.png", "id": "late", "t0": 2}),
        json.dumps({"path": "img/b.png", "id": "seedy", "seed": 1.5}),
        json.dumps({"path": "img/missing.png"}),
        json.dumps({"path": "img/b.png", "id": "nomask", "mask": "img/none.png"}),
        json.dumps({"path": "img/b.png", "id": "img/a.png"}),
        "",
        json.dumps({"id": "pathless"}),
    ]
    manifest = os.path.join(root, "m.jsonl")
    with open(manifest, "w") as f:
        f.write("\n".join(lines) + "\n")
    rows, _, _ = collect({"source": "manifest", "path": manifest, "image_size": SIZE})
    a = rows["img/a.png"]
    assert a["ok"] and a["t0"] == np.float32(0.3) and a["seed"] == 4
    where = f"manifest ({manifest}) line"
    expected = {
        "m.jsonl:2": f"{where} 2: invalid JSON",
        "img/b.png": f"{where} 3: unknown field 'tO'",
        "late": f"{where} 4: t0: 2 is not in (0, 1]",
        "seedy": f"{where} 5: seed: expected an integer, got 1.5",
        "img/missing.png": f"guide ({root}/img/missing.png): file not found",
        "nomask": f"mask ({root}/img/none.png): file not found",
        "img/a.png#duplicate1": f"id ({root}/img/b.png): 'img/a.png' is already used by",
        "pathless": f"{where} 10: path: expected a non-empty string, got None",
    }
    failures = {i: r["error"] for i, r in rows.items() if not r["ok"]}
    assert sorted(failures) == sorted(expected)
    for example_id, reason in expected.items():
        assert failures[example_id].startswith(reason), (example_id, failures[example_id])


def write_tfds_dataset(data_dir, images) -> None:
    """A prepared TFDS data set ``tiny_guides`` (split ``test``) written without a builder."""
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(SIZE, SIZE, 3))})
    folder = os.path.join(data_dir, "tiny_guides", "1.0.0")
    os.makedirs(folder)
    with tf.io.TFRecordWriter(
        os.path.join(folder, "tiny_guides-test.tfrecord-00000-of-00001")
    ) as w:
        for image in images:
            w.write(features.serialize_example({"image": image}))
    tfds.folder_dataset.write_metadata(
        data_dir=folder,
        features=features,
        split_infos=[tfds.core.SplitInfo(name="test", shard_lengths=[len(images)], num_bytes=0)],
    )


@pytest.mark.slow
def test_tfds_source_with_generators(tmp_path):
    images = [random_rgb() for _ in range(5)]
    data_dir = str(tmp_path / "tfds")
    write_tfds_dataset(data_dir, images)
    base = {
        "source": "tfds",
        "tfds": {"name": "tiny_guides", "data_dir": data_dir},
        "image_size": SIZE,
        "seed": 3,
    }

    rows, stream, _ = collect(
        dict(base, generator="composite", generator_kwargs={"size_range": (0.4, 0.7)})
    )
    assert stream.total_examples == 5
    by_index = {int(r["index"]): r for r in rows.values()}
    for index, row in by_index.items():
        image = images[index] / 127.5 - 1.0
        donor = images[(index + 1) % 5] / 127.5 - 1.0  # the next example is the donor
        inside = row["mask"][..., 0] == 1.0
        assert 0 < inside.sum() < inside.size
        np.testing.assert_allclose(row["guide"][inside], donor[inside], atol=1e-6)
        np.testing.assert_allclose(row["guide"][~inside], image[~inside], atol=1e-6)

    painting_kwargs = {"num_colors": 3, "median_size": 3}
    rows, _, _ = collect(dict(base, generator="stroke_painting", generator_kwargs=painting_kwargs))
    for example_id, row in rows.items():
        image = images[int(row["index"])].astype(np.float32) / 127.5 - 1.0
        seed = [3, tf.strings.to_hash_bucket_fast(example_id, 2**63 - 1).numpy()]
        expected = guides.stroke_painting(image, seed, **painting_kwargs).numpy()
        np.testing.assert_allclose(row["guide"], expected, atol=1e-6)
        assert len(np.unique(row["guide"].reshape(-1, 3), axis=0)) <= 3
        np.testing.assert_array_equal(row["mask"], np.ones_like(row["mask"]))


@pytest.mark.parametrize("generator", ["stroke_edit", "composite"])
def test_generated_guides_depend_on_id_and_seed_not_on_batching(tmp_path, generator):
    root = str(tmp_path)
    for i in range(5):
        save(root, f"{i}.png", random_rgb())
    config = {"source": "folder", "path": root, "image_size": SIZE, "generator": generator}
    whole, _, _ = collect(config, batch_size=5)
    resumed, _, _ = collect(config, batch_size=2, completed={"0.png", "3.png"})
    second_host, _, _ = collect(config, batch_size=1, process_index=1, process_count=2)
    for rows in (resumed, second_host):
        for example_id, row in rows.items():
            np.testing.assert_array_equal(row["guide"], whole[example_id]["guide"])
            np.testing.assert_array_equal(row["mask"], whole[example_id]["mask"])
    reseeded, _, _ = collect(dict(config, seed=1), batch_size=5)
    assert not np.array_equal(reseeded["1.png"]["mask"], whole["1.png"]["mask"])


def test_unusable_sources_and_configs_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        guide_inputs.build_catalog({"source": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="no TFRecord files"):
        guide_inputs.build_catalog({"source": "tfrecord", "path": str(tmp_path / "*.rec")})
    with pytest.raises(ValueError, match="sise: unknown field, got 3"):
        guide_inputs.GuideInputConfig.from_mapping({"source": "folder", "path": "x", "sise": 3})
    with pytest.raises(ValueError, match="t0"):
        guide_inputs.GuideInputConfig(source="folder", path="x", t0=0.0)
    # A misspelt generator option is refused by name before any input is read.
    with pytest.raises(ValueError, match=r"generator_kwargs.num_colours: unknown field, got 3"):
        guide_inputs.GuideInputConfig(
            source="folder",
            path="x",
            generator="stroke_painting",
            generator_kwargs={"num_colors": 3, "num_colours": 3},
        )
    with pytest.raises(
        ValueError, match=r"generator_kwargs.points_per_stroke: must be >= 2, got 1"
    ):
        guide_inputs.GuideInputConfig(
            source="folder",
            path="x",
            generator="stroke_edit",
            generator_kwargs={"points_per_stroke": 1},
        )


def test_per_example_t0_is_checked_against_the_models_time_domain(tmp_path):
    """The data layer holds no SDE constant: (eps, T] comes from the model (the job sets it)."""
    root = str(tmp_path)
    save(root, "img/a.png", random_rgb())
    manifest = os.path.join(root, "m.jsonl")
    with open(manifest, "w") as f:
        for i, t0 in enumerate((0.0005, 0.002, 1.0)):
            f.write(json.dumps({"path": "img/a.png", "id": f"r{i}", "t0": t0}) + "\n")
    base = {"source": "manifest", "path": manifest, "image_size": SIZE}
    unit, _, _ = collect(base)
    assert all(unit[i]["ok"] for i in ("r0", "r1", "r2"))
    vp, _, _ = collect({**base, "time_domain": (1e-3, 1.0)})  # VPSDE: eps = 1e-3, T = 1
    assert not vp["r0"]["ok"] and vp["r1"]["ok"] and vp["r2"]["ok"]
    assert vp["r0"]["error"].endswith("t0: 0.0005 is not in (0.001, 1]"), vp["r0"]["error"]
    with pytest.raises(ValueError, match=r"time_domain: expected \(eps, T\) with 0 <= eps < T"):
        guide_inputs.GuideInputConfig.from_mapping({**base, "time_domain": (0.5, 0.1)})
