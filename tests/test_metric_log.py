"""Training metrics reach both TensorBoard and metrics.jsonl with the same values."""

import json
import uuid

from sdedit_jax.util import files, metric_log
from tests.tensorboard_events import tensorboard_scalars


def test_one_write_lands_in_jsonl_and_tensorboard(tmp_path):
    writer = metric_log.training_writer(str(tmp_path))
    writer.write_scalars(3, {"loss": 0.25, "grad_norm": 1.5})
    writer.write_scalars(6, {"loss": 0.125, "grad_norm": 0.75})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rows] == [
        (3, 0.25, 1.5),
        (6, 0.125, 0.75),
    ]
    assert all(isinstance(r["time"], float) for r in rows)
    board = tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert board == {
        (3, "loss"): 0.25,
        (3, "grad_norm"): 1.5,
        (6, "loss"): 0.125,
        (6, "grad_norm"): 0.75,
    }


def test_object_store_log_is_published_at_most_once_a_minute_and_on_close(monkeypatch):
    # Object stores cannot append: each publication rewrites the whole log, so it is rare.
    clock = {"now": 0.0}
    monkeypatch.setattr(metric_log.time, "monotonic", lambda: clock["now"])
    path = f"ram://test-metric-log-{uuid.uuid4().hex}/throughput.jsonl"
    writer = metric_log.JsonlWriter(path, publish_every_s=60.0)
    for step, now in ((1, 5.0), (2, 30.0)):
        clock["now"] = now
        writer.write_scalars(step, {"images_written": step})
    assert not files.exists(path)
    clock["now"] = 61.0
    writer.write_scalars(3, {"images_written": 3})
    assert [json.loads(line)["step"] for line in files.read_lines(path)] == [1, 2, 3]
    clock["now"] = 62.0
    writer.write_scalars(4, {"images_written": 4})
    writer.close()
    assert [json.loads(line)["step"] for line in files.read_lines(path)] == [1, 2, 3, 4]
