"""Progress and ETA count written images (not dispatched batches); the log works on ram://."""

import json
import uuid

from sdedit_jax import files, stream


def test_eta_comes_from_written_images_and_the_log_is_published(monkeypatch, capsys):
    clock = {"now": 100.0}
    monkeypatch.setattr(stream.time, "perf_counter", lambda: clock["now"])
    log = f"ram://test-progress-{uuid.uuid4().hex}/throughput.p00000.jsonl"
    progress = stream.Progress(total_rows=100, log_path=log, every_seconds=5.0, label="t0=0.5")
    clock["now"] = 110.0
    # 8 steps dispatched (say 64 rows) but only 20 images written in 10 s: 2 images/s, 40 s left.
    progress.update(step=8, written=20)
    line = capsys.readouterr().err.strip()
    assert "20/100 images written" in line and "2.00 img/s" in line and "ETA 40s" in line
    clock["now"] = 111.0
    progress.update(step=9, written=21)  # within every_seconds: no line
    assert capsys.readouterr().err == ""
    clock["now"] = 150.0
    progress.update(step=12, written=100, force=True)
    records = [json.loads(line) for line in files.read_lines(log)]
    assert [(r["step"], r["images_written"]) for r in records] == [(8, 20), (12, 100)]
    assert records[-1]["total_images"] == 100 and "ETA 0s" in capsys.readouterr().err
