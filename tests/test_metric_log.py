"""Training metrics reach both TensorBoard and metrics.jsonl with the same values."""

import glob
import json
import os

import tensorflow as tf

from sdedit_jax import metric_log


def _tensorboard_scalars(logdir):
    values = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor))
    return values


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
    board = _tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert board == {
        (3, "loss"): 0.25,
        (3, "grad_norm"): 1.5,
        (6, "loss"): 0.125,
        (6, "grad_norm"): 0.75,
    }
