"""Training metrics through ``clu.metric_writers``: TensorBoard summaries plus ``metrics.jsonl``.

One ``MultiWriter`` feeds both: TensorBoard event files in ``<workdir>/tensorboard``
(process 0 only; ``tensorboard --logdir <workdir>``) and the JSONL file users and
``tools/model_card`` already read, one ``{"step": ..., <scalars>, "time": ...}``
line per call, through the file layer (so ``gs://`` workdirs work).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import jax
from clu import metric_writers

from sdedit_jax import files


class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as JSON lines; the JSONL log holds scalars only, other kinds are ignored."""

    def __init__(self, path: str):
        self.path = path

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {
            "step": int(step),
            **{k: float(v) for k, v in scalars.items()},
            "time": time.time(),
        }
        files.append_bytes(self.path, (json.dumps(record) + "\n").encode())

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
        pass

    def close(self) -> None:
        pass


def training_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard (process 0) and ``metrics.jsonl`` in ``workdir``, as one writer."""
    writers: list[metric_writers.MetricWriter] = [JsonlWriter(files.join(workdir, "metrics.jsonl"))]
    if jax.process_index() == 0:
        writers.append(metric_writers.SummaryWriter(files.join(workdir, "tensorboard")))
    return metric_writers.MultiWriter(writers)
