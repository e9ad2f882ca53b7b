"""A corpus of bad inputs, names and configurations, built here and run through the real CLI.

Principle under test: every input row either produces its output or one failure
row naming the file, the field and the reason; the job finishes the rest and
exits 3; configuration errors are one line (exit 2) before any work; nothing
hangs (every run has a timeout) and no temporary file is left behind.
"""

import json
import os
import struct
import unicodedata
import zlib

import numpy as np
import pytest
from PIL import Image

from sdedit_jax.data import guide_inputs, names
from sdedit_jax.jobs import checks
from sdedit_jax.jobs import run as job
from sdedit_jax.util import files as sdedit_files
from sdedit_jax.util.config import load_config
from tests import job_cli
from tests.job_cli import SIZE

NFC, NFD = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")


def _png16(path: str, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG, written by hand (PIL cannot write one; it reads it as 8-bit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b"")
        )


def _npy_header_only(path: str, shape: tuple, payload: bytes = b"\0" * 64) -> None:
    """An .npy file whose header promises ``shape`` but which holds only ``payload``."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        f.write(payload)


def _exif_jpeg(path: str, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def _assert_clean(tmpdir: str, workdir: str) -> None:
    """No TensorFlow/AutoGraph temp files, no temporary files anywhere in the workdir."""
    assert os.listdir(tmpdir) == []
    for folder, _, names_ in os.walk(workdir):
        assert not [f for f in names_ if sdedit_files.is_temp_name(f)], folder


def _check_outputs(workdir: str, good: set[str], bad: dict[str, list[str]], t0_folders):
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["complete"] and summary["failures"] == len(bad) * len(t0_folders)
    for folder in t0_folders:
        sub = os.path.join(workdir, folder)
        manifest = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
        failures = job_cli.rows(os.path.join(sub, "failures.jsonl"))
        assert set(manifest) == good
        assert set(failures) == set(bad)
        for example_id, words in bad.items():
            reason = failures[example_id]["reason"]
            assert all(w in reason for w in words), (example_id, reason)
        outputs = [row["output"] for row in manifest.values()]
        assert len({o.casefold() for o in outputs}) == len(outputs)
        for out in outputs:
            assert os.path.getsize(os.path.join(sub, out)) > 0
            assert Image.open(os.path.join(sub, out)).size == (SIZE, SIZE)


@pytest.mark.slow
def test_bad_folder_corpus_through_the_cli(tiny_model_dir, tmp_path):
    guides, outside = str(tmp_path / "guides"), str(tmp_path / "outside")
    for i, name in enumerate(
        ["g000.png", "g001.png", "Case.png", "case.png", NFC, NFD, "a.png", "a.png.png/b.png"]
    ):
        job_cli.save_png(os.path.join(guides, name), job_cli.random_guide(i))
    job_cli.save_png(os.path.join(outside, "inner.png"), job_cli.random_guide(20))
    os.symlink(outside, os.path.join(guides, "linked"))  # followed: its files are inputs
    _exif_jpeg(os.path.join(guides, "exif.jpg"), job_cli.random_guide(21), orientation=6)
    os.symlink(guides, os.path.join(guides, "loop"))  # a link to a folder above it
    os.symlink(os.path.join(guides, "gone.png"), os.path.join(guides, "dangling.png"))
    os.mkfifo(os.path.join(guides, "fifo.png"))  # reading it would block forever
    with open(os.path.join(os.fsencode(guides), b"bad\xff.png"), "wb") as f:
        f.write(open(os.path.join(guides, "g000.png"), "rb").read())
    _png16(
        os.path.join(guides, "deep16.png"),
        np.random.default_rng(0).integers(0, 65536, (SIZE, SIZE, 3)),
    )
    _npy_header_only(os.path.join(guides, "short.npy"), (8000, 8000, 3))  # 768 MB promised
    _npy_header_only(os.path.join(guides, "huge.npy"), (10**6, 10**6))
    _npy_header_only(os.path.join(guides, "flat.npy"), (1, 1, 10**9))
    good = {
        "g000.png",
        "g001.png",
        "Case.png",
        "case.png",
        NFC,
        NFD,
        "a.png",
        "a.png.png/b.png",
        "linked/inner.png",
        "exif.jpg",
    }
    bad = {
        "bad\\xff.png": ["bad\\xff.png", "UTF-8"],
        "fifo.png": ["fifo.png", "FIFO"],
        "dangling.png": ["dangling.png", "broken symbolic link"],
        "loop": ["loop", "folder above"],
        "deep16.png": ["deep16.png", "16-bit"],
        "short.npy": ["short.npy", "promises"],
        "huge.npy": ["huge.npy", "max_pixels"],
        "flat.npy": ["flat.npy", "shape"],
    }

    workdir, tmpdir = str(tmp_path / "out"), str(tmp_path / "tmp")
    os.mkdir(tmpdir)
    proc = job_cli.run(job_cli.command(tiny_model_dir, guides, workdir), tmpdir=tmpdir, timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]
    _check_outputs(workdir, good, bad, ["t0_0.40", "t0_0.60"])
    _assert_clean(tmpdir, workdir)


def _jsonl(path: str, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")


@pytest.mark.slow
def test_bad_manifest_corpus_through_the_cli(tiny_model_dir, tmp_path):
    images = tmp_path / "m" / "img"
    for i in range(3):
        job_cli.save_png(str(images / f"g{i}.png"), job_cli.random_guide(i))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 1  # a binary mask saved as {0, 1}: left half editable
    Image.fromarray(mask).save(images / "mask01.png")
    os.mkfifo(images / "fifo.png")
    temp_like = ".x.png.sdedit-tmp-p00000-0123"
    rows = [
        {"path": "img/g0.png", "id": "x"},
        {"path": "img/g0.png", "id": "x.png/y"},
        {"path": "img/g1.png", "id": "a b"},
        {"path": "img/g1.png", "id": "a_b-7dbde93504"},
        {"path": "img/g1.png", "id": "Cat.png"},
        {"path": "img/g1.png", "id": "cat.png"},
        {"path": "img/g2.png", "id": NFC},
        {"path": "img/g2.png", "id": NFD},
        {"path": "img/g2.png", "id": temp_like},
        {"path": "img/g2.png", "mask": "img/mask01.png", "id": "masked01"},
        {"path": "img/g0.png", "id": "seed_negative", "seed": -1},
        {"path": "img/g0.png", "id": "seed_2_32", "seed": 2**32},
        {"path": "img/g0.png", "id": "seed_text", "seed": "abc"},
        {"path": "img/fifo.png", "id": "fifo"},
        {"path": "img", "id": "folder"},
        '{"path": "img/g0.png", "path": "img/g1.png", "id": "repeated_key"}',
        '{"path": "img/\\udcff.png", "id": "surrogate"}',
        {"path": "img/g0.png", "id": "z_last_row"},
    ]
    manifest = str(tmp_path / "m" / "manifest.jsonl")
    _jsonl(manifest, rows)
    good = {
        "x",
        "x.png/y",
        "a b",
        "a_b-7dbde93504",
        "Cat.png",
        "cat.png",
        NFC,
        NFD,
        temp_like,
        "masked01",
        "z_last_row",
    }
    bad = {
        "seed_negative": ["line 11", "seed", "2^31"],
        "seed_2_32": ["line 12", "seed"],
        "seed_text": ["line 13", "seed", "abc"],
        "fifo": ["fifo.png", "FIFO"],
        "folder": ["img", "not a regular file"],
        "manifest.jsonl:16": ["line 16", "'path'", "more than once"],  # no trusted id
        "surrogate": ["guide (", "\\xff.png", "not valid UTF-8"],
    }

    workdir, tmpdir = str(tmp_path / "out"), str(tmp_path / "tmp")
    os.mkdir(tmpdir)
    cmd = job_cli.command(tiny_model_dir, manifest, workdir, t0s="(0.501,0.504)")
    proc = job_cli.run(cmd, tmpdir=tmpdir, timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]
    _check_outputs(workdir, good, bad, ["t0_0.501", "t0_0.504"])  # 2 decimals would collide
    _assert_clean(tmpdir, workdir)

    sub = os.path.join(workdir, "t0_0.501")
    manifest_rows = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
    out = np.asarray(Image.open(os.path.join(sub, manifest_rows["masked01"]["output"])))
    guide = np.asarray(Image.open(images / "g2.png"))
    assert np.array_equal(out[:, SIZE // 2 :], guide[:, SIZE // 2 :])  # mask 0: kept exactly
    assert not np.array_equal(out[:, : SIZE // 2], guide[:, : SIZE // 2])  # mask 1: edited

    before = open(os.path.join(sub, "manifest.jsonl"), "rb").read()
    again = job_cli.run(cmd, tmpdir=tmpdir, timeout=240)
    assert again.returncode == 3
    assert "0 to edit" in again.stderr  # the temp-looking id's output survived the restart
    assert open(os.path.join(sub, "manifest.jsonl"), "rb").read() == before
    assert os.path.isfile(os.path.join(sub, manifest_rows[temp_like]["output"]))


@pytest.mark.slow
def test_csv_with_a_repeated_column_fails_its_rows(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    job_cli.save_png(str(folder / "g0.png"), job_cli.random_guide(0))
    manifest = folder / "manifest.csv"
    manifest.write_text("path,id,path\ng0.png,a,other.png\ng0.png,b,g0.png\n")
    workdir = str(tmp_path / "out")
    proc = job_cli.run(job_cli.command(tiny_model_dir, str(manifest), workdir, t0s="(0.5,)"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    failures = job_cli.rows(os.path.join(workdir, "t0_0.50", "failures.jsonl"))
    assert sorted(failures) == ["manifest.csv:2", "manifest.csv:3"]  # rows named by line
    assert all(
        "repeats column(s) ['path']" in f["reason"] and str(manifest) in f["reason"]
        for f in failures.values()
    )


CLI_CONFIG_ERRORS = [  # (setting, the start of the one-line error)
    ({"t0s": "('a',)"}, "config.t0s: got ('a',); expected a non-empty tuple"),
    ({"t0s": "()"}, "config.t0s: got (); expected a non-empty tuple"),
    ({"t0s": "(0.3,1.5)"}, "config.t0s: got (0.3, 1.5)"),
    ("--config.seed=-1", "config.seed: got -1; expected an int in [0, 2^31)"),
    ("--config.sampler.n_steps=-5", "config.sampler.n_steps: got -5; expected an int >= 0"),
    (
        {"image_size": "(32,32)"},
        "config.input.image_size: got (32, 32); expected (16, 16), the size of the model",
    ),
    ("--config.input.channels=1", "config.input.channels: got 1; expected 3, the channels"),
    ("--config.model_dir=/nonexistent/model", "config.model_dir: cannot load"),
    ("--config.input.path=/nonexistent/guides", "config.input.path: guide folder"),
]


@pytest.mark.parametrize("setting, message", CLI_CONFIG_ERRORS)
@pytest.mark.slow
def test_config_errors_are_one_line_before_any_work(tiny_model_dir, tmp_path, setting, message):
    guides = str(tmp_path / "guides")
    job_cli.save_png(os.path.join(guides, "g.png"), job_cli.random_guide(0))
    workdir = str(tmp_path / "out")
    if isinstance(setting, dict):
        cmd = job_cli.command(tiny_model_dir, guides, workdir, **setting)
    else:
        cmd = job_cli.command(tiny_model_dir, guides, workdir, setting)
    proc = job_cli.run(cmd, timeout=120)
    lines = job_cli.error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"sdedit_jax: {message}"), lines
    assert not os.path.exists(workdir)  # nothing was started


def _config(**changes):
    config = load_config("configs/default.py")
    for key, value in changes.items():
        node, *path = key.split("__")
        target = config
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"t0s": ("a",)}, r"config\.t0s: got \('a',\); expected .*'a' is not"),
        ({"t0s": ()}, r"config\.t0s: got \(\); expected a non-empty tuple"),
        ({"t0s": (0.3, 1.5)}, r"config\.t0s: .*1\.5 is not"),
        ({"t0s": (0.3, 0.3)}, r"config\.t0s: .*distinct"),
        ({"seed": 2**31}, r"config\.seed: got 2147483648; expected an int in \[0, 2\^31\)"),
        ({"sampler__n_steps": -5}, r"config\.sampler\.n_steps: got -5; expected an int >= 0"),
        ({"sampler__steps_per_unit_time": 0}, r"config\.sampler\.sampler: set exactly one"),
        ({"sampler__max_steps": -1}, r"config\.sampler\.max_steps: got -1"),
        ({"sampler__predictor": "bogus"}, r"config\.sampler\.predictor: unknown name 'bogus'"),
        ({"repeats": 0}, r"config\.repeats: got 0"),
        ({"per_device_batch": 0}, r"config\.per_device_batch: got 0"),
        ({"input__source": "ftp"}, r"config\.input\.source: expected one of"),
        (
            {"input__image_size": (16, "a")},
            r"config\.input\.image_size: expected \(height, width\)",
        ),
        ({"input__t0_min": 2.0}, r"config\.input\.t0_min: unknown field, got 2\.0"),
    ],
)
def test_check_config_names_field_value_and_rule(changes, message):
    with pytest.raises(job.ConfigError, match=message):
        checks.check_config(_config(**changes))


def test_exif_orientation_turns_images_upright(tmp_path):
    stored = np.random.default_rng(0).integers(0, 256, (8, 16, 3)).astype(np.uint8)
    path = str(tmp_path / "photo.jpg")
    _exif_jpeg(path, stored, orientation=6)  # "rotate 90 degrees clockwise to view"
    with Image.open(path) as image:
        raw = np.asarray(image.convert("RGB"))  # the decoder's pixels, as stored
    config = guide_inputs.GuideInputConfig(source="folder", path=str(tmp_path), image_size=(16, 8))
    guide, _ = guide_inputs.decode_example(config, path, path, "", b"", b"", b"")
    assert guide.shape == (16, 8, 3)
    np.testing.assert_allclose(guide, np.rot90(raw, k=-1) / 127.5 - 1.0, atol=1e-6)


def test_npy_header_is_checked_before_allocating(tmp_path):
    path = str(tmp_path / "short.npy")
    _npy_header_only(path, (8000, 8000, 3))
    config = guide_inputs.GuideInputConfig(source="folder", path=str(tmp_path))
    with pytest.raises(guide_inputs.BadInput, match=r"promises 768000000 bytes .* holds 64"):
        guide_inputs.decode_example(config, path, path, "", b"", b"", b"")


def test_output_name_clash_becomes_a_failure_row(monkeypatch, tmp_path):
    # A stand-in for an 80-bit hash collision; only ids that are not plain (here: upper
    # case) can collide under the real rule, so the catalog checks only those.
    monkeypatch.setattr(names, "output_name", lambda i: i.lower() + ".png")
    for name in ("CAT.png", "Cat.png", "cat.png"):
        job_cli.save_png(str(tmp_path / name), job_cli.random_guide(0))
    catalog = guide_inputs.build_catalog({"source": "folder", "path": str(tmp_path)})
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    assert errors["CAT.png"] == "" and errors["cat.png"] == ""
    assert "clashes with that of id 'CAT.png'" in errors["Cat.png"]


def test_tfrecord_seeds_outside_the_int32_key_range_fail_their_rows(tmp_path):
    import tensorflow as tf

    image = open(_write_png(tmp_path / "g.png"), "rb").read()
    shard = str(tmp_path / "data.tfrecord")
    with tf.io.TFRecordWriter(shard) as writer:
        for example_id, seed in (("ok", 7), ("negative", -1), ("big", 2**32), ("top", 2**31 - 1)):
            writer.write(guide_inputs.tf_example(image, id=example_id, seed=seed))
    catalog = guide_inputs.build_catalog({"source": "tfrecord", "path": shard})
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    assert errors["ok"] == "" and errors["top"] == ""
    assert "feature 'seed': -1 is not in [0, 2^31)" in errors["negative"]
    assert "feature 'seed': 4294967296 is not in [0, 2^31)" in errors["big"]
    assert shard in errors["big"]


def _write_png(path) -> str:
    job_cli.save_png(str(path), job_cli.random_guide(0))
    return str(path)
