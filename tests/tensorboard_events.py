"""Reads TensorBoard event files back (what a user's ``tensorboard --logdir`` would show)."""

import glob
import os

import tensorflow as tf


def tensorboard_scalars(logdir: str) -> dict[tuple[int, str], float]:
    """{(step, tag): value} of every scalar in ``logdir``'s event files."""
    values = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor))
    return values
