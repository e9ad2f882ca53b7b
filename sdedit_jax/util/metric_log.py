"""Metrics through ``clu.metric_writers``: TensorBoard summaries plus a JSONL log.

One ``MultiWriter`` feeds both: TensorBoard event files (``tensorboard --logdir
<workdir>``) and the JSONL file users and ``sdedit_jax.tools.model_card`` read,
one ``{"step": ..., <scalars>, "time": ...}`` line per call, through the file
layer (so ``gs://`` workdirs work). Training writes ``metrics.jsonl``; jobs and
evaluations write their progress (images written, images/s) the same way.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from clu import metric_writers

from sdedit_jax.util import files


class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines; the JSONL log holds scalars only, other kinds are ignored.

    Local files get each line at once. Object stores cannot append (the whole
    log is published again), so there lines are held and published at most
    every ``publish_every_s`` seconds and on ``flush``.
    """

    def __init__(self, path: str, publish_every_s: float = 60.0):
        self.path, self.publish_every_s = path, publish_every_s
        self._pending: list[str] = []
        self._last_publish = time.monotonic()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {
            "step": int(step),
            **{k: float(v) for k, v in scalars.items()},
            "time": time.time(),
        }
        self._pending.append(json.dumps(record) + "\n")
        due = time.monotonic() - self._last_publish > self.publish_every_s
        if due or files.is_local(self.path):
            self.flush()

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def write_hparams(self, hparams) -> None:
        del hparams

    def flush(self) -> None:
        if self._pending:
            data = "".join(self._pending).encode()
            try:
                if files.is_local(self.path):
                    _append_no_follow(self.path, data)
                else:
                    files.append_bytes(self.path, data)
            except OSError as e:  # a full disk must say which file it could not write
                raise OSError(e.errno, f"{e.strerror or e} (writing {self.path})") from e
            self._pending = []
        self._last_publish = time.monotonic()

    def close(self) -> None:
        self.flush()


def _append_no_follow(path: str, data: bytes) -> None:
    """Appends to a local log, never through a symbolic link (logs live in workdirs)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, f"{path} is a symbolic link; logs follow no link") from None
        raise
    with os.fdopen(fd, "ab") as f:
        f.write(data)


def metric_writer(jsonl_path: str, tensorboard_dir: str | None) -> metric_writers.MetricWriter:
    """``jsonl_path`` and, unless ``tensorboard_dir`` is None, TensorBoard, as one writer."""
    writers: list[metric_writers.MetricWriter] = [JsonlWriter(jsonl_path)]
    if tensorboard_dir is not None:
        writers.append(metric_writers.SummaryWriter(tensorboard_dir))
    return metric_writers.MultiWriter(writers)


def training_writer(workdir: str) -> metric_writers.MetricWriter:
    """``metrics.jsonl`` in ``workdir`` and TensorBoard in ``workdir/tensorboard`` (process 0)."""
    board = files.join(workdir, "tensorboard") if jax.process_index() == 0 else None
    return metric_writer(files.join(workdir, "metrics.jsonl"), board)
