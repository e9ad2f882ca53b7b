"""Output sinks: atomic files, exact resume after crashes (incl. kill -9), surfaced errors."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from sdedit_jax.data import images
from sdedit_jax.jobs import manifest as job_manifest
from sdedit_jax.jobs import sinks
from sdedit_jax.util import files

SIZE = 6
JOB = {"sampler": "euler_maruyama", "n_steps": 10, "repeats": 1, "model_checksum": "abc123"}


def output_for(index: int) -> np.ndarray:
    """A deterministic output in [-1, 1] for example ``index`` (what a real job would compute)."""
    return np.random.default_rng(index).uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)


def example(index: int) -> dict:
    return {
        "id": f"dir/ex{index:03d}.png",
        "source": f"/data/dir/ex{index:03d}.png",
        "t0": np.float32(0.3),
        "seed": 7,
    }


def run_job(workdir, indices, *, process_index=0, **kwargs) -> None:
    with sinks.Sink(workdir, process_index=process_index, job_fields=JOB, **kwargs) as sink:
        for i in indices:
            if i % 5 == 4:  # every fifth example is a bad input
                sink.write_failure(
                    id=example(i)["id"], source=example(i)["source"], reason="guide (x): corrupt"
                )
            else:
                sink.write(**example(i), image=output_for(i))


def _file_facts(path: str) -> dict:
    """What a manifest row must record of an output: the file's byte size and sha256."""
    data = open(path, "rb").read()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def leftover_temps(workdir) -> list[str]:
    return [n for _, _, names in os.walk(workdir) for n in names if files.is_temp_name(n)]


def records(workdir, kind="manifest") -> list[str]:
    """The per-batch completion records in ``workdir`` (before ``finalize`` merges them)."""
    return sorted(n for n in os.listdir(workdir) if n.startswith(f"{kind}.p"))


def test_outputs_rows_and_round_trip(tmp_path):
    workdir = str(tmp_path)
    run_job(workdir, range(3), npz="per_example")
    summary = job_manifest.finalize(workdir)
    rows = read_jsonl(os.path.join(workdir, "manifest.jsonl"))
    assert summary.manifest_rows == 3 and [r["id"] for r in rows] == [
        example(i)["id"] for i in range(3)
    ]
    for i, row in enumerate(rows):
        stem = sinks.output_stem(example(i)["id"])
        assert row == {
            **JOB,
            "id": example(i)["id"],
            "source": example(i)["source"],
            "output": "images/" + sinks.output_name(example(i)["id"]),
            "npz": f"arrays/{stem}.npz",
            "t0": 0.3,
            "seed": 7,
            **{
                f"{k}_{m}": _file_facts(os.path.join(workdir, row[k]))[m]
                for k in ("output", "npz")
                for m in ("size", "sha256")
            },
        }
        png = np.asarray(Image.open(os.path.join(workdir, row["output"])))
        expected = np.clip(np.round((output_for(i) + 1) * 127.5), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(png, expected)
        np.testing.assert_array_equal(
            np.load(os.path.join(workdir, row["npz"]))["image"], output_for(i)
        )
    assert leftover_temps(workdir) == []


def test_atomic_write_leaves_target_intact_on_failure(tmp_path, monkeypatch):
    target = str(tmp_path / "out.bin")
    sinks.atomic_write_bytes(target, b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        sinks.atomic_write_bytes(target, b"new")
    assert open(target, "rb").read() == b"old"
    assert leftover_temps(str(tmp_path)) == []


def image_path(i: int) -> str:
    return "images/" + sinks.output_name(example(i)["id"])


def test_resume_after_simulated_crash_gives_the_uninterrupted_result(tmp_path):
    reference, crashed = str(tmp_path / "reference"), str(tmp_path / "crashed")
    run_job(reference, range(12))
    job_manifest.finalize(reference)

    run_job(crashed, range(6))
    # What a kill leaves: example 6's PNG published but not its record, and an
    # orphan temporary file of an interrupted publication of example 7.
    sinks.atomic_write_bytes(os.path.join(crashed, image_path(6)), b"partial run's bytes")
    orphan = files.temp_name(os.path.join(crashed, image_path(7)), "p00000")
    with open(orphan, "wb") as f:
        f.write(b"half")

    done = job_manifest.completed_ids(crashed)
    assert done == {example(i)["id"] for i in range(6)}
    assert done == {
        i
        for i in (example(j)["id"] for j in range(12))
        if i in job_manifest.completed_index(crashed)
    }
    run_job(crashed, [i for i in range(12) if example(i)["id"] not in done])
    assert not os.path.exists(orphan)
    summary = job_manifest.finalize(crashed)
    assert summary.ignored_lines == 0
    assert records(crashed) == [] and records(crashed, "failures") == []  # merged, then deleted
    for name in ("manifest.jsonl", "failures.jsonl"):
        assert (
            open(os.path.join(crashed, name)).read() == open(os.path.join(reference, name)).read()
        )
    for i in range(12):
        if i % 5 != 4:
            assert (
                open(os.path.join(crashed, image_path(i)), "rb").read()
                == open(os.path.join(reference, image_path(i)), "rb").read()
            )


KILLED_WRITER = """
import importlib.util, sys, numpy as np
spec = importlib.util.spec_from_file_location("sinks", sys.argv[1])
sinks = sys.modules["sinks"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sinks)  # by path: the package __init__ would import jax
workdir, count = sys.argv[2], int(sys.argv[3])
from sdedit_jax.jobs import manifest
done = manifest.completed_index(workdir)
with sinks.Sink(workdir, job_fields={"n_steps": 10}, num_threads=2) as sink:
    for i in range(count):
        example_id = f"ex{i:03d}"
        if example_id in done:
            continue
        image = np.random.default_rng(i).uniform(-1, 1, (64, 64, 3)).astype(np.float32)
        sink.write(id=example_id, source="s", image=image, t0=0.5, seed=i)
"""


@pytest.mark.slow
def test_repeated_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    count = 80
    script = [sys.executable, "-c", KILLED_WRITER, sinks.__file__]
    env = {
        **os.environ,
        "PYTHONPATH": os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.abspath(sinks.__file__)))
        ),
    }
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    subprocess.run(script + [reference, str(count)], check=True, timeout=60, env=env)
    job_manifest.finalize(reference)

    kills = 0
    for target_rows in (5, 25, 50):
        process = subprocess.Popen(script + [killed, str(count)], env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.isdir(killed) and len(records(killed)) >= target_rows:
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        process.wait()
    subprocess.run(script + [killed, str(count)], check=True, timeout=60, env=env)
    assert kills >= 1
    job_manifest.finalize(killed)
    assert (
        open(os.path.join(killed, "manifest.jsonl")).read()
        == open(os.path.join(reference, "manifest.jsonl")).read()
    )
    assert len(read_jsonl(os.path.join(killed, "manifest.jsonl"))) == count


def test_writer_errors_surface_and_are_not_lost(tmp_path):
    sink = sinks.Sink(str(tmp_path))
    sink.write(id="good", source="s", image=np.zeros((SIZE, SIZE, 3)), t0=0.5, seed=0)
    sink.write(id="bad", source="s", image=np.zeros((SIZE, SIZE)), t0=0.5, seed=0)
    with pytest.raises(sinks.SinkError, match=r"1 background write\(s\) failed.*'bad'"):
        sink.close()
    with pytest.raises(sinks.SinkError, match="'bad'"):
        sink.close()
    assert job_manifest.completed_ids(str(tmp_path)) == {"good"}
    with pytest.raises(ValueError, match="written by the sink"):
        sinks.Sink(str(tmp_path / "other"), job_fields={"seed": 1})


def test_write_batch_skips_padding_and_records_failures(tmp_path):
    workdir = str(tmp_path)
    outputs = np.stack([output_for(i) for i in range(4)])
    outputs[2, 0, 0, 0] = np.nan
    batch = {
        "id": np.array([b"a", b"b", b"c", b""]),
        "source": np.array([b"sa", b"sb", b"sc", b""]),
        "t0": np.full([4], 0.5, np.float32),
        "seed": np.arange(4, dtype=np.int64),
        "valid": np.array([True, True, True, False]),
        "ok": np.array([True, False, True, False]),
        "error": np.array([b"", b"mask (m.png): size 7x8 does not match guide 8x8", b"", b""]),
    }
    with sinks.Sink(workdir) as sink:
        sink.write_batch(batch, outputs, fields={"step": 3})
    job_manifest.finalize(workdir)
    manifest = read_jsonl(os.path.join(workdir, "manifest.jsonl"))
    failures = read_jsonl(os.path.join(workdir, "failures.jsonl"))
    assert [r["id"] for r in manifest] == ["a"] and manifest[0]["step"] == 3
    assert failures == [
        {
            "id": "b",
            "source": "sb",
            "reason": "mask (m.png): size 7x8 does not match guide 8x8",
            "step": 3,
        },
        {"id": "c", "source": "sc", "reason": "output: 1 non-finite values", "step": 3},
    ]
    assert job_manifest.completed_ids(workdir) == {"a", "b", "c"}
    assert job_manifest.completed_ids(workdir, retry_failed=True) == {"a"}


def test_processes_write_own_files_and_retried_failures_are_dropped(tmp_path):
    workdir = str(tmp_path)
    run_job(workdir, [0, 2, 4], process_index=0)
    run_job(workdir, [1, 3, 5], process_index=1)
    # One record per write call, named by process, run and sequence number.
    assert [n.split(".")[1] for n in records(workdir)] == ["p00000"] * 2 + ["p00001"] * 3
    assert [n.split(".")[1] for n in records(workdir, "failures")] == ["p00000"]
    assert job_manifest.completed_ids(workdir) == {example(i)["id"] for i in range(6)}
    # Retrying the failed example 4 (e.g. after fixing its file) succeeds.
    with sinks.Sink(workdir, process_index=0, job_fields=JOB) as sink:
        sink.write(**example(4), image=output_for(4))
    summary = job_manifest.finalize(workdir)
    assert summary.manifest_rows == 6 and summary.failure_rows == 0
    ids = [r["id"] for r in read_jsonl(os.path.join(workdir, "manifest.jsonl"))]
    assert ids == sorted(example(i)["id"] for i in range(6))


def test_rows_with_missing_outputs_are_redone_not_finalized(tmp_path):
    workdir = str(tmp_path)
    run_job(workdir, [0, 1])
    os.remove(os.path.join(workdir, image_path(1)))
    assert job_manifest.completed_ids(workdir) == {example(0)["id"]}
    summary = job_manifest.finalize(workdir)
    assert summary.missing_outputs == [example(1)["id"]] and summary.manifest_rows == 1


def test_output_stems_are_safe_and_distinct():
    ids = ["a b", "a_b", "../../etc/passwd", "/abs", "x/./y", "ünï", "ok/name.png"]
    stems = [sinks.output_stem(i) for i in ids]
    assert len(set(stems)) == len(ids)
    # names.output_name keeps a plain ``.png`` id as it is; the stem drops the extension.
    assert sinks.output_name("ok/name.png") == "ok/name.png"
    assert sinks.output_stem("ok/name.png") == "ok/name"
    for stem in stems:
        parts = stem.split("/")
        assert all(p not in ("", ".", "..") for p in parts) and not stem.startswith("/")


def test_npz_shards_png_levels_and_progress_count_on_a_non_local_file_system():
    workdir = f"ram://test-sinks-{uuid.uuid4().hex}/out"
    outputs = np.stack([output_for(i) for i in range(4)])
    batch = {
        "id": np.array([b"a", b"b", b"c", b""]),
        "source": np.array([b"sa", b"sb", b"sc", b""]),
        "t0": np.full([4], 0.5, np.float32),
        "seed": np.arange(4, dtype=np.int64),
        "valid": np.array([True, True, True, False]),
        "ok": np.array([True, False, True, False]),
        "error": np.array([b"", b"guide (b): corrupt", b"", b""]),
    }
    sizes = {}
    for level in (0, 9):
        sub = files.join(workdir, f"level{level}")
        with sinks.Sink(sub, npz="shards", png_compression=level, num_threads=3) as sink:
            sink.write_batch(batch, outputs)
        assert sink.rows_written == 3  # padding is not an example
        job_manifest.finalize(sub)
        rows = [json.loads(line) for line in files.read_lines(files.join(sub, "manifest.jsonl"))]
        assert [(r["id"], r["npz_index"]) for r in rows] == [("a", 0), ("c", 1)]
        assert rows[0]["npz"] == rows[1]["npz"] and rows[0]["npz"].startswith("arrays/")
        shard = np.load(io.BytesIO(files.read_bytes(files.join(sub, rows[0]["npz"]))))
        assert shard["id"].tolist() == ["a", "c"]
        np.testing.assert_array_equal(shard["image"], outputs[[0, 2]])
        for row, i in zip(rows, (0, 2), strict=True):
            png = np.asarray(
                Image.open(io.BytesIO(files.read_bytes(files.join(sub, row["output"]))))
            )
            np.testing.assert_array_equal(png, images.to_uint8(output_for(i)))
        sizes[level] = files.size(files.join(sub, rows[0]["output"]))
    assert sizes[0] >= sizes[9]
    smooth = np.tile(np.linspace(-1, 1, 64, dtype=np.float32)[:, None, None], (1, 64, 3))
    stored, packed = sinks.png_bytes(smooth, 0), sinks.png_bytes(smooth, 9)
    assert len(stored) > 4 * len(packed)  # the level reaches the encoder; pixels are the same
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(stored))), np.asarray(Image.open(io.BytesIO(packed)))
    )


def test_sink_options_are_checked():
    with pytest.raises(ValueError, match="npz: expected one of"):
        sinks.Sink("ram://x/y", npz="zip")
    with pytest.raises(ValueError, match="png=False needs"):
        sinks.Sink("ram://x/y", png=False)
    with pytest.raises(ValueError, match="png_compression: expected an int in 0..9, got 10"):
        sinks.Sink("ram://x/y", png_compression=10)


def test_completed_index_matches_the_string_set_and_hashes_ignore_array_width():
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ/._-üé中 0123456789")
    ids = sorted({"".join(rng.choice(alphabet, rng.integers(1, 40))) for _ in range(3000)})
    done, other = ids[::2], ids[1::2]
    index = job_manifest.CompletedIds.from_ids(iter(done), chunk=100)
    assert len(index) == len(done)
    assert index.contains(np.array(ids)).tolist() == [i in set(done) for i in ids]
    assert all(i in index for i in done[:50]) and not any(i in index for i in other[:50])
    # A hash depends on the id alone: not on the array it sits in, nor str vs UTF-8 bytes.
    wide = np.array(["x", "y" * 300])
    assert job_manifest.id_hashes(wide)[0] == job_manifest.id_hashes(["x"])[0]
    assert job_manifest.id_hashes(["ü"])[0] == job_manifest.id_hashes([b"\xc3\xbc"])[0]
    assert len(set(job_manifest.id_hashes(["a" * n for n in range(1, 30)]).tolist())) == 29


def test_hand_edited_records_keep_their_good_rows(tmp_path):
    path = tmp_path / "manifest.p00000.r1.000000.jsonl"
    good = [json.dumps({"id": f"x{i}", "output": "o"}) for i in range(3)]
    path.write_bytes(
        "\n".join(
            [good[0], '{"id": "trunc', "1, 2", "", good[1], "[3,", "4]", '"no id"', good[2]]
        ).encode()
        + b"\n\xff\n"
    )
    for block in (1, 4, 4096):
        rows = [(r, line) for r, line in job_manifest._iter_rows(str(path), block=block)]
        assert [r["id"] for r, _ in rows if r] == ["x0", "x1", "x2"]
        assert sum(r is None for r, _ in rows) == 6
    assert job_manifest.read_rows(str(path))[1] == 6


def _rewrite_rows(path: str, edit) -> None:
    rows = read_jsonl(path)
    with open(path, "w") as f:
        f.writelines(json.dumps(edit(dict(r))) + "\n" for r in rows)


def test_ids_the_file_system_cannot_hold_fail_alone_and_stay_failed(tmp_path):
    workdir = str(tmp_path / "w")
    too_long = "/".join(["b" * 120] * 40)  # 4839 bytes: over PATH_MAX
    too_deep = "/".join(["c"] * 1000)  # short, but 999 folder levels
    ids = ["good0", too_long, "good1", too_deep, "s\ud800", "good2"]
    batch = {
        "id": np.array(ids),
        "source": np.array([f"/src/{i}" for i in range(len(ids))]),
        "t0": np.full(len(ids), 0.3, np.float32),
        "seed": np.arange(len(ids)),
        "valid": np.ones(len(ids), bool),
        "ok": np.ones(len(ids), bool),
        "error": np.array([""] * len(ids)),
    }
    outputs = np.stack([output_for(i) for i in range(len(ids))])
    with sinks.Sink(workdir, job_fields=JOB) as sink:  # one batch: the bad rows' batch-mates
        sink.write_batch(batch, outputs)
    assert job_manifest.completed_ids(workdir) == set(ids)  # a re-run redoes none of them
    summary = job_manifest.finalize(workdir)
    manifest = {r["id"]: r for r in read_jsonl(os.path.join(workdir, "manifest.jsonl"))}
    failures = {r["id"]: r for r in read_jsonl(os.path.join(workdir, "failures.jsonl"))}
    assert set(manifest) == {"good0", "good1", "good2", "s\ud800"}
    assert set(failures) == {too_long, too_deep} and summary.failure_rows == 2
    needed = len(os.path.join(os.path.abspath(workdir), "images", sinks.output_name(too_long)))
    assert f"has {needed} bytes" in failures[too_long]["reason"] and needed > 4095
    assert "at most 4095 bytes" in failures[too_long]["reason"]
    assert "999 folder levels" in failures[too_deep]["reason"]
    assert failures[too_long]["reason"].startswith("id (/src/1): ")
    assert not os.path.exists(os.path.join(workdir, "images", "c")), "no folders for a bad id"
    for row in manifest.values():
        assert _file_facts(os.path.join(workdir, row["output"])) == {
            "size": row["output_size"],
            "sha256": row["output_sha256"],
        }


def test_resume_redoes_truncated_or_corrupt_outputs_and_trusts_older_rows(tmp_path):
    workdir = str(tmp_path)
    run_job(workdir, range(4))
    job_manifest.finalize(workdir)
    path = {
        i: os.path.join(workdir, "images", sinks.output_name(example(i)["id"])) for i in range(4)
    }
    data = open(path[0], "rb").read()
    open(path[0], "wb").write(data[: len(data) - 10])  # truncated: the PNG header still reads
    flipped = bytearray(open(path[1], "rb").read())
    flipped[len(flipped) // 2] ^= 1
    open(path[1], "wb").write(bytes(flipped))  # same size, one bit wrong
    done = job_manifest.completed_ids(workdir)
    assert done == {example(i)["id"] for i in (2, 3)}
    summary = job_manifest.finalize(workdir)  # sizes only: the truncated one is left out
    assert summary.missing_outputs == [example(0)["id"]]
    # Rows of older versions (no size, no checksum): a non-empty file counts as done.
    run_job(workdir, [0])
    job_manifest.finalize(workdir)
    strip = ("output_size", "output_sha256")
    _rewrite_rows(
        os.path.join(workdir, "manifest.jsonl"),
        lambda r: {k: v for k, v in r.items() if k not in strip},
    )
    assert job_manifest.completed_ids(workdir) == {example(i)["id"] for i in range(4)}


def test_a_link_planted_in_the_workdir_is_never_written_through(tmp_path):
    from sdedit_jax.jobs import workdir_lock
    from sdedit_jax.util import metric_log

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep")
    workdir = tmp_path / "w"
    (workdir / "images").mkdir(parents=True)
    os.symlink(outside, workdir / "images" / "dir")  # where the outputs of dir/... go
    with pytest.raises(sinks.LinkInWorkdir, match=r"images/dir is a symbolic link.*remove it"):
        sinks.Sink(str(workdir))
    os.remove(workdir / "images" / "dir")
    os.symlink(victim, workdir / "job.p00000.lock")
    with pytest.raises(workdir_lock.LinkInWorkdir, match=r"job.p00000.lock is a symbolic link"):
        workdir_lock.acquire(str(workdir))
    os.symlink(victim, workdir / "throughput.jsonl")
    writer = metric_log.JsonlWriter(str(workdir / "throughput.jsonl"))
    with pytest.raises(OSError, match="is a symbolic link"):
        writer.write_scalars(0, {"images": 1.0})
    assert victim.read_text() == "keep" and sorted(os.listdir(outside)) == ["victim.txt"]
