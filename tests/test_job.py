"""The batch job end to end, as users run it: `python -m sdedit_jax.main` in subprocesses.

Invariances: 8 devices == 1 device == 2 processes (jax.distributed on
localhost), file for file and bit for bit; kill -9 at random points and
restart == uninterrupted; bad inputs are listed and the rest completes.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests import job_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = job_cli.SIZE


def _write_guides(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    for i in range(n):
        pixels = np.full((SIZE, SIZE, 3), 255, np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, SIZE - 4, 2)
            pixels[y : y + 5, x : x + 5] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(os.path.join(folder, f"g{i:03d}.png"))
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[rng.integers(0, 8) :, : rng.integers(8, SIZE + 1)] = 255
        Image.fromarray(mask if i % 3 else np.full_like(mask, 255)).save(
            os.path.join(folder, "masks", f"g{i:03d}.png")
        )


def _job_command(tiny_model_dir, guides, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "sdedit_jax.main",
        "--config",
        "configs/default.py",
        f"--config.model_dir={tiny_model_dir}",
        f"--config.input.path={guides}",
        f"--config.input.image_size=({SIZE},{SIZE})",
        "--config.t0s=(0.4,0.6)",
        "--config.sampler.steps_per_unit_time=20",
        "--config.per_device_batch=2",
        f"--workdir={workdir}",
        *extra,
    ]


def _env(devices, tmpdir=None):
    env = dict(os.environ, **({"TMPDIR": tmpdir} if tmpdir else {}))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(REPO, ".jax_cache")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(cmd, devices, check=True, tmpdir=None):
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(devices, tmpdir), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def _outputs(workdir):
    """Every file a job leaves that must be reproducible, with its bytes."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), workdir)
            if (
                rel in ("contact_sheet.png", "summary.json")
                or rel.startswith("t0_")
                and (
                    rel.endswith(".png")
                    or rel.endswith("manifest.jsonl")
                    or rel.endswith("failures.jsonl")
                )
            ):
                with open(os.path.join(root, name), "rb") as f:
                    files[rel] = f.read()
    return files


@pytest.fixture(scope="module")
def guides_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("guides"))
    _write_guides(path, 40)
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, guides_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref8"))
    _run(_job_command(tiny_model_dir, guides_dir, workdir), devices=8)
    return _outputs(workdir)


@pytest.mark.slow
def test_job_is_identical_on_1_and_8_devices_and_2_processes(
    tiny_model_dir, guides_dir, reference, tmp_path
):
    assert len([k for k in reference if k.startswith("t0_") and k.endswith(".png")]) == 80
    assert "contact_sheet.png" in reference and json.loads(reference["summary.json"])["complete"]
    rows = reference["t0_0.40/manifest.jsonl"].decode().splitlines()
    assert len(rows) == 40 and json.loads(rows[0])["model_sha256"]

    one = str(tmp_path / "one")
    _run(_job_command(tiny_model_dir, guides_dir, one), devices=1)
    assert _outputs(one) == reference

    two = str(tmp_path / "two")
    cmd = [
        "bash",
        "launch/local_multiprocess.sh",
        "2",
        "configs/default.py",
        two,
        *_job_command(tiny_model_dir, guides_dir, two)[5:-1],
    ]
    env = {**_env(4), "PY": sys.executable, "DEVICES_PER_PROCESS": "4"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(two) == reference


@pytest.mark.slow
def test_kill_9_and_restart_equals_uninterrupted(tiny_model_dir, guides_dir, reference, tmp_path):
    workdir = str(tmp_path / "killed")
    cmd = _job_command(tiny_model_dir, guides_dir, workdir)
    rng = np.random.default_rng(0)
    interrupted = 0
    tmpdir = str(tmp_path / "tmp")  # TensorFlow's temp folder: a kill must leave nothing there
    os.mkdir(tmpdir)
    for kill_after_rows in sorted(rng.integers(2, 60, 3)):
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=_env(8, tmpdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            done = sum(
                len(open(os.path.join(workdir, d, f)).read().splitlines())
                for d in (os.listdir(workdir) if os.path.isdir(workdir) else [])
                if d.startswith("t0_")
                # per-batch records, and what finalize merged them into
                for f in os.listdir(os.path.join(workdir, d))
                if f.startswith("manifest.")
            )
            if done >= kill_after_rows:
                break
            time.sleep(0.05)
        interrupted += proc.poll() is None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert interrupted >= 2  # the kills really landed mid-job
    _run(cmd, devices=8, tmpdir=tmpdir)
    assert _outputs(workdir) == reference  # contact sheet and summary.json included
    assert os.listdir(tmpdir) == []


@pytest.mark.slow
def test_bad_inputs_are_listed_and_the_rest_completes(tiny_model_dir, tmp_path):
    guides = str(tmp_path / "guides")
    _write_guides(guides, 4)
    with open(os.path.join(guides, "g000.png"), "rb") as f:
        good = f.read()
    with open(os.path.join(guides, "truncated.png"), "wb") as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(guides, "noise.png"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(300))
    Image.fromarray(np.zeros((SIZE + 1, SIZE, 3), np.uint8)).save(
        os.path.join(guides, "wrong_size.png")
    )
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(
        os.path.join(guides, "mask_mismatch.png")
    )
    Image.fromarray(np.zeros((SIZE, SIZE - 2), np.uint8)).save(
        os.path.join(guides, "masks", "mask_mismatch.png")
    )
    for name in ("truncated", "noise", "wrong_size"):
        Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(
            os.path.join(guides, "masks", f"{name}.png")
        )
    np.save(os.path.join(guides, "nan.npy"), np.full((SIZE, SIZE, 3), np.nan, np.float32))
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(
        os.path.join(guides, "masks", "nan.png")
    )

    workdir = str(tmp_path / "out")
    proc = _run(_job_command(tiny_model_dir, guides, workdir), devices=2, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["failures"] == 2 * 5
    for sub in ("t0_0.40", "t0_0.60"):
        rows = [json.loads(line) for line in open(os.path.join(workdir, sub, "manifest.jsonl"))]
        assert sorted(r["id"] for r in rows) == [f"g{i:03d}.png" for i in range(4)]
        failures = {
            json.loads(line)["id"]: json.loads(line)["reason"]
            for line in open(os.path.join(workdir, sub, "failures.jsonl"))
        }
        assert sorted(failures) == [
            "mask_mismatch.png",
            "nan.npy",
            "noise.png",
            "truncated.png",
            "wrong_size.png",
        ]
        assert "mask" in failures["mask_mismatch.png"] and "size" in failures["mask_mismatch.png"]
        assert "truncated.png" in failures["truncated.png"]
        assert "wrong_size.png" in failures["wrong_size.png"]
        assert "finite" in failures["nan.npy"] or "nan" in failures["nan.npy"].lower()
