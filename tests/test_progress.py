"""Progress counts written images (not dispatched batches); its log works on ram://."""

import json
import uuid

from sdedit_jax import files, metric_log, progress


def test_rate_comes_from_written_images_and_the_log_is_published(monkeypatch, capsys):
    clock = {"now": 100.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock["now"])
    log = f"ram://test-progress-{uuid.uuid4().hex}/throughput.p00000.jsonl"
    writer = metric_log.metric_writer(log, tensorboard_dir=None)
    with progress.Progress(total=100, writer=writer, label="t0=0.5", every_s=5.0) as bar:
        clock["now"] = 110.0
        # 8 steps dispatched (say 64 rows) but only 20 images written in 10 s: 2 images/s.
        bar.update(step=8, done=20)
        clock["now"] = 111.0
        bar.update(step=9, done=21)  # within every_s: no record
        clock["now"] = 150.0
        bar.update(step=12, done=100)
    # Object stores get the log published on close (ram:// counts as one here).
    records = [json.loads(line) for line in files.read_lines(log)]
    assert [(r["step"], r["images_written"]) for r in records] == [(8, 20), (12, 100)]
    assert records[0]["images_per_s"] == 2.0 and records[0]["elapsed_s"] == 10.0
    assert records[-1]["total_images"] == 100 and records[-1]["images_per_s"] == 2.0
    # Not a terminal: every redraw is its own line (no carriage returns in log files).
    lines = capsys.readouterr().err.splitlines()
    assert lines and all("\r" not in line and line.startswith("[t0=0.5]") for line in lines)
    assert "100/100" in lines[-1]


def test_close_writes_the_last_count_once(monkeypatch, tmp_path):
    clock = {"now": 0.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock["now"])
    log = str(tmp_path / "throughput.jsonl")
    with progress.Progress(total=10, writer=metric_log.metric_writer(log, None), label="x") as bar:
        clock["now"] = 1.0  # before every_s: nothing yet
        bar.update(step=1, done=4)
        assert not files.exists(log)
        clock["now"] = 2.0
        bar.update(step=2, done=10)
    rows = [json.loads(line) for line in open(log)]
    assert [(r["step"], r["images_written"], r["images_per_s"]) for r in rows] == [(2, 10, 5.0)]


def test_skipped_images_leave_the_total_so_the_bar_completes(monkeypatch, tmp_path, capsys):
    clock = {"now": 0.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock["now"])
    log = str(tmp_path / "throughput.jsonl")
    with progress.Progress(total=30, writer=metric_log.metric_writer(log, None), label="x") as bar:
        bar.skip(20)  # e.g. settings read back from a cache
        clock["now"] = 5.0
        bar.update(step=1, done=10)
    rows = [json.loads(line) for line in open(log)]
    assert [(r["images_written"], r["total_images"], r["images_per_s"]) for r in rows] == [
        (10, 10, 2.0)
    ]
    assert "10/10" in capsys.readouterr().err.splitlines()[-1]
