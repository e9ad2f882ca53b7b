"""The job's behaviour under errors, signals, double launches and damaged workdirs (real CLI).

Every run has a timeout: a hang fails the test instead of stalling the suite.
"""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from sdedit_jax.util import files
from tests import job_cli


def _guides(folder: str, n: int) -> str:
    for i in range(n):
        job_cli.save_png(os.path.join(folder, f"g{i:03d}.png"), job_cli.random_guide(i))
    return folder


def _popen(cmd, stderr_path, devices=2, **kwargs):
    return subprocess.Popen(
        cmd,
        cwd=job_cli.REPO,
        env=job_cli.env(devices),
        stdout=subprocess.DEVNULL,
        stderr=open(stderr_path, "w"),
        **kwargs,
    )


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _text(path):
    return open(path, errors="replace").read() if os.path.exists(path) else ""


@pytest.mark.slow
def test_double_launch_is_refused_naming_the_other_process(tiny_model_dir, tmp_path):
    guides = _guides(str(tmp_path / "guides"), 24)
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(tiny_model_dir, guides, workdir)
    first = _popen(cmd, str(tmp_path / "first.err"))
    try:
        lock = os.path.join(workdir, "job.p00000.lock")
        assert _wait_for(lambda: f'"pid": {first.pid}' in _text(lock))
        first.send_signal(signal.SIGSTOP)  # hold it mid-job, however fast the machine is
        second = job_cli.run(cmd, timeout=120)
        first.send_signal(signal.SIGCONT)
        lines = job_cli.error_lines(second.stderr)
        assert second.returncode == 2, second.stderr[-2000:]
        assert len(lines) == 1 and f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert first.wait(timeout=300) == 0, _text(tmp_path / "first.err")[-2000:]
    finally:
        first.kill()
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["complete"] and summary["edited"] == 2 * 24
    for sub in ("t0_0.40", "t0_0.60"):
        rows = open(os.path.join(workdir, sub, "manifest.jsonl")).read().splitlines()
        assert sorted(json.loads(r)["id"] for r in rows) == [f"g{i:03d}.png" for i in range(24)]


@pytest.mark.slow
def test_an_error_mid_stream_ends_the_process_at_once(tiny_model_dir, tmp_path):
    guides = _guides(str(tmp_path / "guides"), 12)
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(tiny_model_dir, guides, workdir, t0s="(0.4,)")
    assert job_cli.run(cmd, devices=1).returncode == 0
    images = os.path.join(workdir, "t0_0.40", "images")
    for i in range(4, 12):
        os.remove(os.path.join(images, f"g{i:03d}.png"))
    # A folder where the output of g008 must go: its write fails in the middle of the
    # stream (batches of 2: g004+g005 are written first, g010+g011 are still queued).
    os.makedirs(os.path.join(images, "g008.png", "junk"))
    for attempt in range(3):
        err = str(tmp_path / f"err{attempt}")
        proc = _popen(cmd, err, devices=1)
        try:
            assert _wait_for(lambda err=err: "sdedit_jax: error" in _text(err), timeout=240)
            noticed = time.time()
            proc.wait(timeout=10)
            assert time.time() - noticed < 5, "the process lingered after reporting its error"
        finally:
            proc.kill()
        lines = job_cli.error_lines(_text(err))
        assert proc.returncode == 1 and "Traceback" not in _text(err)
        assert any("g008.png" in line and "(writing " in line for line in lines), lines
    os.rmdir(os.path.join(images, "g008.png", "junk"))
    os.rmdir(os.path.join(images, "g008.png"))
    assert job_cli.run(cmd, devices=1).returncode == 0
    assert json.load(open(os.path.join(workdir, "summary.json")))["complete"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_the_job_at_once_and_it_resumes(tiny_model_dir, tmp_path, signum):
    guides = _guides(str(tmp_path / "guides"), 16)
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(
        tiny_model_dir, guides, workdir, "--config.sampler.steps_per_unit_time=200"
    )
    err = str(tmp_path / "err")
    proc = _popen(cmd, err)
    try:
        # Stop it during its first compilation, where Python alone would not see the signal.
        assert _wait_for(lambda: "to edit" in _text(err))
        proc.send_signal(signum)
        sent = time.time()
        proc.wait(timeout=10)
        assert time.time() - sent < 3
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, _text(err)[-2000:]
    assert f"stopped by {signum.name}" in _text(err) and "Abort" not in _text(err)
    done = job_cli.run(cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.load(open(os.path.join(workdir, "summary.json")))["edited"] == 2 * 16


# Files may not grow past 300 bytes (EFBIG instead of SIGXFSZ): a full disk, for this process
# only. Set in a small launcher that then execs the job (no fork hooks in the test process).
_FULL_DISK = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300)); "
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file(tiny_model_dir, tmp_path):
    guides = _guides(str(tmp_path / "guides"), 4)
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(tiny_model_dir, guides, workdir, t0s="(0.4,)")
    assert job_cli.run(cmd).returncode == 0
    for name in os.listdir(os.path.join(workdir, "t0_0.40", "images")):
        os.remove(os.path.join(workdir, "t0_0.40", "images", name))
    proc = job_cli.run([cmd[0], "-c", _FULL_DISK, *cmd[1:]])
    lines = job_cli.error_lines(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert any(
        "File too large" in line
        and "(writing " in line
        and os.path.join(workdir, "t0_0.40", "images") in line
        for line in lines
    ), lines


@pytest.mark.slow
def test_retry_failed_from_the_command_line(tiny_model_dir, tmp_path):
    guides = _guides(str(tmp_path / "guides"), 3)
    good = open(os.path.join(guides, "g000.png"), "rb").read()
    with open(os.path.join(guides, "broken.png"), "wb") as f:
        f.write(good[: len(good) // 2])
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(tiny_model_dir, guides, workdir, t0s="(0.4,)")
    assert job_cli.run(cmd).returncode == 3
    with open(os.path.join(guides, "broken.png"), "wb") as f:  # the user fixes the file
        f.write(good)
    assert job_cli.run(cmd).returncode == 3  # failures are not retried by default
    retried = job_cli.run(cmd + ["--retry_failed"])
    assert retried.returncode == 0, retried.stderr[-2000:]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["failures"] == 0 and summary["edited"] == 4
    rows = job_cli.rows(os.path.join(workdir, "t0_0.40", "manifest.jsonl"))
    assert "broken.png" in rows
    assert os.path.getsize(os.path.join(workdir, "t0_0.40", "failures.jsonl")) == 0


@pytest.mark.slow
def test_resume_repairs_sheet_summary_empty_outputs_and_temp_files(tiny_model_dir, tmp_path):
    guides = _guides(str(tmp_path / "guides"), 5)
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(tiny_model_dir, guides, workdir)
    assert job_cli.run(cmd).returncode == 0
    sheet, summary = (
        os.path.join(workdir, "contact_sheet.png"),
        os.path.join(workdir, "summary.json"),
    )
    output = os.path.join(workdir, "t0_0.60", "images", "g002.png")
    before = {p: open(p, "rb").read() for p in (sheet, summary, output)}
    with open(sheet, "r+b") as f:
        f.truncate(100)  # what an in-place write interrupted by a kill left before
    os.remove(summary)
    open(output, "wb").close()  # a 0-byte output (a lost write-back) is not a result
    orphan = files.temp_name(summary, "p00000")
    open(orphan, "wb").close()
    proc = job_cli.run(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[t0_0.60] 1 to edit" in proc.stderr or "1 to edit" in proc.stderr
    assert {p: open(p, "rb").read() for p in before} == before
    assert not os.path.exists(orphan)
    assert json.loads(before[summary])["complete"]


@pytest.mark.slow
def test_summary_describes_the_whole_workdir_across_invocations(tiny_model_dir, tmp_path):
    guides = _guides(str(tmp_path / "guides"), 4)
    workdir = str(tmp_path / "out")
    cmd = job_cli.command(tiny_model_dir, guides, workdir, t0s="(0.4,)")
    assert job_cli.run(cmd).returncode == 0
    for i in (4, 5):
        job_cli.save_png(os.path.join(guides, f"g{i:03d}.png"), job_cli.random_guide(i))
    proc = job_cli.run(cmd)
    assert proc.returncode == 0
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["inputs"] == 6 and summary["edited"] == 6 and summary["complete"]
    this_run = json.loads(proc.stdout)["this_run"]
    assert sum(s["edited"] for s in this_run["sub_jobs"]) == 2
    assert np.all([s["remaining"] == 0 for s in summary["sub_jobs"]])
