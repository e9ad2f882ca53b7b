"""Manifest rows and guide folders that must never stop, hang or swamp a job.

One bad line is one failure row (through the real CLI, first run and re-run); the
chunked manifest parser equals the per-line one; the bulk clash check equals
``names.find_clashes``; folder listing visits each real folder once; no FIFO is ever
opened blocking; a manifest's catalog keeps no per-row Python objects.
"""

import contextlib
import json
import os
import signal
import tracemalloc

import numpy as np
import pytest

from sdedit_jax.data import guide_inputs, names
from sdedit_jax.data.guide_inputs import catalog as catalog_module
from sdedit_jax.data.guide_inputs.sources import manifest as manifest_module
from tests import job_cli


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises TimeoutError in the test if the block runs longer (a hang is a failure)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _write_lines(path, lines: list[bytes]) -> str:
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def _good(i: int) -> bytes:
    return json.dumps({"path": "g0.png", "id": f"good{i}"}).encode()


# Each bad line, the failure row's id, and words its reason must hold.
BAD_LINES = {
    "seed of 5000 digits": (
        b'{"path": "g0.png", "id": "bigseed", "seed": ' + b"9" * 5000 + b"}",
        "bigseed",
        ["line 2", "seed", "5000 digits", "[0, 2^31)"],
    ),
    "t0 of 5000 digits": (
        b'{"path": "g0.png", "id": "bigt0", "t0": -' + b"9" * 5000 + b"}",
        "bigt0",
        ["line 3", "t0", "5000 digits"],
    ),
    "nested 100,000 deep": (
        b"[" * 100_000 + b"]" * 100_000,
        "manifest.jsonl:4",
        ["line 4", "deep"],
    ),
    "an invalid UTF-8 byte": (
        b'{"path": "g0.png", "id": "bad\xffbyte"}',
        "manifest.jsonl:5",
        ["line 5", "not UTF-8", "byte 29"],
    ),
    "lone surrogate in id": (b'{"path": "g0.png", "id": "\\ud800"}', "\\ud800", ["id (", "UTF-8"]),
    "lone surrogate in path": (
        b'{"path": "\\ud800.png", "id": "surrogate_path"}',
        "surrogate_path",
        ["guide (", "\\ud800.png", "UTF-8"],
    ),
    "lone surrogate in mask": (
        b'{"path": "g0.png", "mask": "m\\ud800.png", "id": "surrogate_mask"}',
        "surrogate_mask",
        ["mask (", "m\\ud800.png", "UTF-8"],
    ),
}


def _bad_manifest(folder) -> str:
    job_cli.save_png(str(folder / "g0.png"), job_cli.random_guide(0))
    lines = [_good(0)]
    for line, _, _ in BAD_LINES.values():
        lines.append(line)
    lines += [_good(1), _good(2)]
    return _write_lines(folder / "manifest.jsonl", lines)


def test_each_bad_line_is_one_failure_row_of_the_catalog(tmp_path):
    manifest = _bad_manifest(tmp_path)
    with deadline(60):
        catalog = guide_inputs.build_catalog({"source": "manifest", "path": manifest})
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    assert len(errors) == 3 + len(BAD_LINES)
    for case, (_, row_id, words) in BAD_LINES.items():
        assert all(w in errors[row_id] for w in words), (case, errors[row_id])
        assert len(errors[row_id]) < 400, case  # one readable line, not the 5000 digits
    assert [errors[f"good{i}"] for i in range(3)] == ["", "", ""]
    # Every id, path and reason can enter tf.data and a JSON manifest.
    for name in ("source", "guide_path", "mask_path", "error"):
        for text in catalog.columns[name]:
            text.encode("utf-8")
    for example_id in catalog.ids:
        example_id.encode("utf-8")


def test_line_numbers_hold_with_crlf_endings_and_a_bad_byte(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(
        b'{"path": "g.png", "id": "a"}\r\n'
        b'{"path": "g.png", "id": "\xff"}\r\n'
        b"\r\n"
        b'{"path": "g.png", "id": "d", "seed": -1}\r\n'
        b'{"path": "g.png", "id": "e"}\r\n'
    )
    catalog = guide_inputs.build_catalog({"source": "manifest", "path": str(manifest)})
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    assert errors["a"] == errors["e"] == ""
    assert "line 2: not UTF-8" in errors["m.jsonl:2"]
    assert "line 4: seed" in errors["d"]


def test_of_two_rows_with_one_id_the_first_line_keeps_it(tmp_path):
    """Whatever path each row takes (bulk or per-row checks), ties keep line order."""
    lines = [
        b'{"path": "g.png", "id": "y", "seed": -1}',
        b'{"path": "g.png", "id": "x"}',
        b'{"path": "g.png", "id": "x", "seed": -1}',
        b'{"path": "g.png", "id": "y"}',
    ]
    manifest = _write_lines(tmp_path / "m.jsonl", lines)
    catalog = guide_inputs.build_catalog({"source": "manifest", "path": manifest})
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    assert catalog.ids == ["x", "x#duplicate1", "y", "y#duplicate1"]
    assert errors["x"] == "" and "line 3: seed" in errors["x#duplicate1"]
    assert "line 1: seed" in errors["y"] and "already used" in errors["y#duplicate1"]


def test_a_csv_row_with_a_bad_byte_fails_alone(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,id\ng0.png,a\ng0.png,b\xff\ng0.png,c\n")
    catalog = guide_inputs.build_catalog({"source": "manifest", "path": str(manifest)})
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    assert errors["a"] == errors["c"] == ""
    assert "line 3" in errors["m.csv:3"] and "UTF-8" in errors["m.csv:3"]


@pytest.mark.slow
def test_bad_lines_through_the_cli_first_run_and_rerun(tiny_model_dir, tmp_path):
    manifest = _bad_manifest(tmp_path)
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(tiny_model_dir, manifest, workdir, t0s="(0.5,)")
    proc = job_cli.run(cmd, timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]  # 3: done, some inputs failed
    sub = os.path.join(workdir, "t0_0.50")
    done = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
    failed = job_cli.rows(os.path.join(sub, "failures.jsonl"))
    assert sorted(done) == ["good0", "good1", "good2"]
    assert sorted(failed) == sorted(row_id for _, row_id, _ in BAD_LINES.values())
    for _, row_id, words in BAD_LINES.values():
        assert all(w in failed[row_id]["reason"] for w in words), failed[row_id]
    before = open(os.path.join(sub, "failures.jsonl"), "rb").read()
    again = job_cli.run(cmd, timeout=240)
    assert again.returncode == 3, again.stderr[-3000:]
    assert "0 to edit" in again.stderr
    assert open(os.path.join(sub, "failures.jsonl"), "rb").read() == before  # not repeated


# Lines that a chunked parse could misread: nesting, repeated keys, colons and braces
# in strings, two objects on a line, objects split over lines, nulls, blanks, CRLF.
TRICKY_LINES = [
    b'{"path": "a.png", "id": "plain"}',
    b'{"path": "a.png", "id": "nested", "seed": {"x": 1}}',
    b'{"path": "a.png", "path": "b.png", "id": "repeated"}',
    b'{"path": "gs://bucket/a.png", "id": "colon:in:strings"}',
    b'{"path": "a.png", "id": "brace{in}string"}',
    b'{"path": "a.png", "id": "two"}, {"path": "b.png", "id": "objects"}',
    b'{"path": "a.png", "id": "split", "x": [',
    b'{"path": "b.png"}]}',
    b'{"path": "a.png", "id": "one"},[',
    b'{"path": "b.png", "id": "array"}]',
    b'{"path": "a.png", "id": "null_mask", "mask": null}',
    b"   ",
    b'{"path": "a.png", "id": "crlf"}\r',
    b'  {"path": "a.png", "id": "indented", "t0": 0.25, "seed": 7}',
    b'{"path": "a.png", "id": "t0_text", "t0": "0.3"}',
    b'{"path": "a.png", "id": "bool_seed", "seed": true}',
    b'{"path": "a.png", "id": "big_t0", "t0": 1e400}',
    b'{"path": "a.png", "id": "huge_float_t0", "t0": 1' + b"0" * 400 + b"}",
    b'{"path": "a.png", "id": "Upper/Case.PNG"}',
    b'{"path": "a.png", "id": "caf\xc3\xa9"}',
    b'{"path": "a.png", "id": "plain"}',
    b"[]",
    b'{"path": "", "id": "empty_path"}',
    b'{"path": "a.png", "id": "", "tO": 0.3}',
]


def _columns(manifest: str) -> dict:
    catalog = guide_inputs.build_catalog(
        {"source": "manifest", "path": manifest, "time_domain": (0.001, 1.0)}
    )
    return {k: v.tolist() for k, v in catalog.columns.items()}


def test_chunked_parsing_equals_parsing_line_by_line(tmp_path, monkeypatch):
    lines = []
    for i in range(3):  # each tricky line among plain ones, and in several chunks
        lines += TRICKY_LINES + [_good(100 * i + j) for j in range(20)]
    manifest = _write_lines(tmp_path / "m.jsonl", lines)
    monkeypatch.setattr(manifest_module, "_CHUNK_BYTES", 700)
    chunked = _columns(manifest)
    monkeypatch.setattr(manifest_module, "_json_chunk", lambda lines: None)
    per_line = _columns(manifest)
    assert chunked == per_line
    errors = dict(zip(chunked["id"], chunked["error"], strict=True))
    assert "appears more than once" in errors["m.jsonl:3"]  # no id can be trusted
    assert errors["plain"] == "" and "already used" in errors["plain#duplicate1"]
    assert errors["colon:in:strings"] == errors["brace{in}string"] == errors["crlf"] == ""
    assert errors["null_mask"] == errors["indented"] == errors["t0_text"] == ""
    assert "seed" in errors["nested"] and "seed" in errors["bool_seed"]
    assert "t0" in errors["big_t0"] and "t0" in errors["huge_float_t0"]
    # Canonical order: Python's sorted ids (ties in line order), on every host alike.
    raw_ids = [i.removesuffix("#duplicate1").removesuffix("#duplicate2") for i in chunked["id"]]
    assert raw_ids == sorted(raw_ids)


def test_the_bulk_clash_check_equals_find_clashes():
    ids = [
        "a.png",
        "a",
        "a~.png",
        "x",
        "x.png/y",
        "x.png",
        "sub/cat.png",
        "sub/Cat.png",
        "SUB/cat.png",
        "café.png",
        "cafe\u0301.png",
        ".hidden",
        "a//b",
        "a/.b",
        "-ok_1.0",
        "k" * 121,
        "/".join(["d"] * 70),
        "q/" * 30 + "z.png",
        "img 1.JPG",
        "dir.png/file.png",
    ] + [f"images/{i:05d}.png" for i in range(3000)]
    rng = np.random.default_rng(0)
    for order in (ids, list(rng.permutation(ids))):
        assert catalog_module._clashes(np.array(order)) == names.find_clashes(order)
    plain = catalog_module._plain_ids(ids)
    for example_id, is_plain in zip(ids, plain, strict=True):
        if is_plain:  # the premise of the bulk check, under the real naming rule
            suffix = "" if example_id.endswith(".png") else "~.png"
            assert names.output_name(example_id) == example_id + suffix
    assert plain[-1] and not plain[ids.index("sub/Cat.png")] and not plain[ids.index("x.png/y")]


def test_a_ladder_of_links_is_listed_once_per_folder(tmp_path):
    """Each level holds a file and two links to the next level: 2^40 paths, 41 folders."""
    levels = 40
    for level in range(levels + 1):
        job_cli.save_png(str(tmp_path / f"L{level}" / f"f{level}.png"), job_cli.random_guide(0))
    for level in range(levels):
        for link in ("a", "b"):
            os.symlink(tmp_path / f"L{level + 1}", tmp_path / f"L{level}" / link)
    os.symlink(tmp_path / "L0", tmp_path / f"L{levels}" / "loop")  # a cycle back to the top
    with deadline(30):
        catalog = guide_inputs.build_catalog(
            {"source": "folder", "path": str(tmp_path / "L0"), "folder": {"mask_dir": ""}}
        )
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    files = {i: e for i, e in errors.items() if i.endswith(".png")}
    assert len(files) == levels + 1 and not any(files.values())  # each file once, via a/
    assert files.keys() == {"a/" * level + f"f{level}.png" for level in range(levels + 1)}
    skipped = {i: e for i, e in errors.items() if not i.endswith(".png")}
    assert len(skipped) == levels + 1  # every b link, and the loop
    assert all("already listed" in e or "folder above" in e for e in skipped.values())
    assert "already listed under '.'" in skipped["a/" * levels + "loop"]


def test_a_link_to_a_folder_of_the_tree_does_not_list_it_twice(tmp_path):
    job_cli.save_png(str(tmp_path / "real" / "x.png"), job_cli.random_guide(0))
    os.symlink(tmp_path / "real", tmp_path / "alias")  # sorts before "real"
    catalog = guide_inputs.build_catalog({"source": "folder", "path": str(tmp_path)})
    errors = dict(zip(catalog.ids, catalog.columns["error"], strict=True))
    assert errors["real/x.png"] == ""
    assert "already listed under 'real'" in errors["alias"]


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_fifos_and_devices_are_failure_rows_never_opened(tmp_path, source):
    root = tmp_path / "in"
    job_cli.save_png(str(root / "good.png"), job_cli.random_guide(0))
    job_cli.save_png(str(root / "masked.png"), job_cli.random_guide(1))
    os.mkfifo(root / "fifo.png")
    os.symlink("/dev/zero", root / "device.png")
    masks = root / "masks"
    job_cli.save_png(str(masks / "good.png"), np.full((16, 16), 255, np.uint8))
    os.mkfifo(masks / "masked.png")  # a FIFO as a mask
    if source == "folder":
        config = {"source": "folder", "path": str(root), "image_size": (16, 16)}
        expected = {"fifo.png": "FIFO", "device.png": "a device", "masks/masked.png": "FIFO"}
    else:
        rows = [{"path": f"{n}.png", "id": n} for n in ("fifo", "device")] + [
            {"path": f"{n}.png", "mask": f"masks/{n}.png", "id": n} for n in ("good", "masked")
        ]
        manifest = root / "m.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"source": "manifest", "path": str(manifest), "image_size": (16, 16)}
        expected = {"fifo": "FIFO", "device": "a device", "masked": "FIFO"}
    with deadline(60):
        stream = guide_inputs.make_guide_dataset(
            config, batch_size_per_host=4, process_index=0, process_count=1
        )
        batches = list(stream.dataset.as_numpy_iterator())
    reasons = {
        i.decode(): e.decode()
        for b in batches
        for i, e, v in zip(b["id"], b["error"], b["valid"], strict=True)
        if v
    }
    assert reasons["good.png" if source == "folder" else "good"] == ""
    for row_id, words in expected.items():
        name = os.path.basename(row_id).removesuffix(".png") + ".png"
        assert words in reasons[row_id] and name in reasons[row_id], reasons[row_id]


def test_a_fifo_as_the_manifest_is_refused_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "m.jsonl")
    with deadline(30), pytest.raises(ValueError, match="FIFO, not a regular file"):
        guide_inputs.build_catalog({"source": "manifest", "path": str(tmp_path / "m.jsonl")})


def test_a_manifest_catalog_keeps_no_per_row_python_objects(tmp_path, monkeypatch):
    """50,000 rows with distinct paths: the catalog costs under 400 bytes a row at its
    peak (rows as Python objects cost about 1 KB each), and holds no per-row objects
    but its path strings."""
    rows = 50_000
    with open(tmp_path / "m.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"path": f"guides/{i:07d}.png", "id": f"images/{i:08d}.png"}))
            f.write("\n")
    config = {"source": "manifest", "path": str(tmp_path / "m.jsonl")}
    monkeypatch.setattr(manifest_module, "_CHUNK_BYTES", 1 << 16)  # transients ~1,000 rows
    tracemalloc.start()
    try:
        catalog = guide_inputs.build_catalog(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(catalog) == rows
    assert peak / rows < 400, f"{peak / rows:.0f} bytes per row"
    assert catalog.columns["id"].dtype.kind == "U" and catalog.columns["seed"].dtype == np.int64
    assert len(set(map(id, catalog.columns["error"]))) == 1  # one shared ""
