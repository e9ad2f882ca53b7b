"""The job's rows through the real CLI: rows that cannot be written, changed inputs, damaged
outputs, links planted in the workdir. Every run has a timeout (a hang fails the test)."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests import job_cli

SIZE = job_cli.SIZE


def _jsonl(path: str, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return path


def _guides(folder, n: int) -> None:
    for i in range(n):
        job_cli.save_png(str(folder / f"g{i}.png"), job_cli.random_guide(i))
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask // 2).save(folder / "half.png")


def _run(model, manifest, workdir, **kwargs):
    cmd = job_cli.command(model, manifest, workdir, t0s="(0.5,)")
    return job_cli.run(cmd, devices=1, timeout=240, **kwargs)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_rows_the_file_system_cannot_hold_fail_alone_on_every_run(tiny_model_dir, tmp_path):
    _guides(tmp_path / "img", 4)
    bad = {
        "/".join(["b" * 120] * 40): "4095 bytes",  # 40 components of 120 characters
        "/".join(["c"] * 1000): "999 folder levels",
        "s\\ud800": "id (",  # the id as shown (a lone surrogate cannot be written)
        "path_surrogate": "not valid UTF-8",
        "mask_surrogate": "not valid UTF-8",
        "junk": "junk.png'>)",  # the decoder names the file by its path, not a descriptor
    }
    rows = [
        {"path": "img/g0.png", "id": "a0"},
        {"path": "img/g1.png", "id": "/".join(["b" * 120] * 40)},
        {"path": "img/g2.png", "id": "/".join(["c"] * 1000)},
        '{"path": "img/g3.png", "id": "s\\ud800"}',
        '{"path": "img/g\\ud800.png", "id": "path_surrogate"}',
        '{"path": "img/g1.png", "mask": "img/m\\ud800.png", "id": "mask_surrogate"}',
        {"path": "img/g1.png", "id": "a1"},
        {"path": "img/g2.png", "id": "c0"},  # sorts between the bad ids: a batch-mate of one
        {"path": "img/g3.png", "id": "z9"},
        {"path": "img/junk.png", "id": "junk"},
    ]
    (tmp_path / "img" / "junk.png").write_bytes(b"not an image")
    manifest = _jsonl(str(tmp_path / "manifest.jsonl"), rows)
    good = {"a0", "a1", "c0", "z9"}
    runs, stderr = [], []
    for attempt in range(3):  # a re-run, then an identical run (same path, fresh workdir)
        workdir = "out"
        if attempt == 2:
            os.rename(tmp_path / "out", tmp_path / "first")
        proc = _run(tiny_model_dir, manifest, str(tmp_path / workdir))
        assert proc.returncode == 3, proc.stderr[-3000:]
        stderr.append(proc.stderr)
        sub = str(tmp_path / workdir / "t0_0.50")
        manifest_rows = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
        lines = open(os.path.join(sub, "failures.jsonl"), "rb").read().splitlines()
        failures = {json.loads(line)["id"]: json.loads(line)["reason"] for line in lines}
        assert set(manifest_rows) == good and len(lines) == len(bad) == len(failures)
        for example_id, words in bad.items():
            assert words in failures[example_id], failures[example_id]
        runs.append(b"\n".join(lines))
    assert "10 to edit" in stderr[0] and "0 to edit, 10 already done" in stderr[1]
    assert runs[0] == runs[1] == runs[2]  # byte-identical: no fd, temp name or pid in a reason


@pytest.mark.slow
def test_changed_inputs_fail_and_damaged_outputs_are_redone_on_resume(tiny_model_dir, tmp_path):
    _guides(tmp_path / "img", 4)
    rows = [
        {"path": f"img/g{i}.png", "id": f"e{i}", "seed": i, "mask": "img/mask.png"}
        for i in range(4)
    ]
    workdir = str(tmp_path / "out")
    sub = os.path.join(workdir, "t0_0.50")
    assert _run(tiny_model_dir, _jsonl(str(tmp_path / "a.jsonl"), rows), workdir).returncode == 0
    first = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
    png = {i: os.path.join(sub, row["output"]) for i, row in first.items()}
    original = {i: open(p, "rb").read() for i, p in png.items()}
    open(png["e0"], "wb").write(original["e0"][:-20])  # truncated (its header still reads)
    flipped = bytearray(original["e1"])
    flipped[len(flipped) // 2] ^= 1  # same size, one bit
    open(png["e1"], "wb").write(bytes(flipped))
    rows[2]["seed"], rows[3]["mask"] = 99, "img/half.png"
    changed = _jsonl(str(tmp_path / "b.jsonl"), rows)

    proc = _run(tiny_model_dir, changed, workdir)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 to edit, 2 already done" in proc.stderr
    assert all(open(png[i], "rb").read() == original[i] for i in ("e0", "e1"))  # redone
    failures = job_cli.rows(os.path.join(sub, "failures.jsonl"))
    assert {i: f["inputs_changed"] for i, f in failures.items()} == {"e2": "seed", "e3": "mask"}
    assert (
        "seed changed" in failures["e2"]["reason"]
        and "(2 then, 99 now)" in failures["e2"]["reason"]
    )
    second = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
    assert second == first  # the earlier outputs and their rows stay
    assert all(_sha(png[i]) == row["output_sha256"] for i, row in second.items())
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["sub_jobs"][0]["remaining"] == 0 and summary["failures"] == 2

    # Rows of older versions (no digest, size or checksum) resume as they did.
    old = ("inputs", "output_size", "output_sha256")
    with open(os.path.join(sub, "manifest.jsonl"), "w") as f:
        f.writelines(
            json.dumps({k: v for k, v in row.items() if k not in old}) + "\n"
            for row in second.values()
        )
    proc = _run(tiny_model_dir, changed, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 to edit, 4 already done" in proc.stderr
    assert not os.path.getsize(os.path.join(sub, "failures.jsonl"))


@pytest.mark.slow
def test_links_in_the_workdir_and_ram_workdirs_are_refused(tiny_model_dir, tmp_path):
    _guides(tmp_path / "img", 1)
    manifest = _jsonl(str(tmp_path / "m.jsonl"), [{"path": "img/g0.png", "id": "x"}])
    outside = tmp_path / "outside"
    outside.mkdir()
    workdir = tmp_path / "out"
    workdir.mkdir()
    os.symlink(outside, workdir / "tensorboard")  # TensorBoard's writer would follow it
    expected = {
        str(workdir): f"{workdir}/tensorboard is a symbolic link",
        "ram://job": "vanishes with this process",
    }
    for target, words in expected.items():
        proc = _run(tiny_model_dir, manifest, target)
        lines = job_cli.error_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert words in lines[0], lines
    assert os.listdir(outside) == []


def test_each_input_field_changes_the_digest_and_is_named():
    from sdedit_jax.jobs import manifest, plan

    def columns(**change):
        base = {
            "id": np.array(["a", "b"]),
            "source": np.array(["/g/a.png", "/g/b.png"], object),
            "guide_path": np.array(["/g/a.png", "/g/b.png"], object),
            "mask_path": np.array(["", "/m/b.png"], object),
            "t0": np.array([0.5, 0.5], np.float32),
            "seed": np.array([1, 2], np.int64),
        }
        for name, value in change.items():
            base[name] = base[name].copy()
            base[name][1] = value
        return base

    recorded = {"source": "/g/b.png", "seed": 2, "t0": 0.5, "output": "images/b.png"}
    done = manifest.DigestTable(columns())
    index = manifest.CompletedIds(manifest.id_hashes(["a", "b"]), done.values)
    assert not plan.changed(columns(), done, index).any()
    assert (
        plan.changed(columns(), done, manifest.CompletedIds(manifest.id_hashes(["b"]))).sum() == 0
    )
    cases = {"path": {"source": "/h/b.png"}, "seed": {"seed": 3}, "t0": {"t0": 0.6}}
    cases["mask"] = {"mask_path": "/m/other.png"}
    for field, change in cases.items():
        now = columns(**change)
        assert list(plan.changed(now, manifest.DigestTable(now), index)) == [False, True]
        assert plan.changed_field(recorded, now, 1) == field
    reason = plan.reason("seed", recorded, columns(seed=3), 1)
    assert "seed changed" in reason and "(2 then, 3 now)" in reason and "images/b.png" in reason


def test_a_damaged_output_named_in_the_contact_sheet_error(tmp_path):
    from sdedit_jax.jobs import contact_sheet

    path = tmp_path / "x.png"
    Image.fromarray(job_cli.random_guide(0)).save(path)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(OSError, match=f"contact sheet: cannot read {path}"):
        contact_sheet.read_png(str(path))
