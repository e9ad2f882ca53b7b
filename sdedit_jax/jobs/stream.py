"""The streaming loop of a batch job: host batches in, sharded edits, outputs to a sink.

:func:`run_stream` turns each host-local batch into global arrays, dispatches
the :class:`~sdedit_jax.engine.Editor`'s compiled program asynchronously and
hands the outputs to the sink's writer threads, so tf.data prefetch, compute
and writes overlap; :class:`~sdedit_jax.util.progress.Progress` counts images
dispatched and written.
Nothing here jits: the one program is the engine's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from sdedit_jax import rng
from sdedit_jax.engine import EditBatch, Editor
from sdedit_jax.jobs import text
from sdedit_jax.sampling.steps import StepRule
from sdedit_jax.util.progress import Progress


class _LocalRows:
    """This process's rows of a global output, fetched only when numpy asks.

    Handing this (not the array) to the writer thread keeps the device-to-host
    copy off the dispatch loop.
    """

    def __init__(self, array: jax.Array):
        self._shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)

    def __array__(self, dtype=None, copy=None):
        rows = np.concatenate([np.asarray(s.data) for s in self._shards])
        return rows if dtype is None else rows.astype(dtype)


@dataclasses.dataclass
class JobSummary:
    """What one process did in a job."""

    batches: int
    rows_done: int
    rows_failed: int
    seconds: float
    first_batch_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.rows_done / self.seconds if self.seconds > 0 else 0.0


def run_stream(
    editor: Editor,
    placed_score,
    batches: Iterable[dict[str, np.ndarray]],
    sink,
    *,
    step_rule: StepRule,
    manifest_fields: dict[str, Any] | None = None,
    progress: Progress | None = None,
    conditioner: text.Conditioner | None = None,
) -> JobSummary:
    """Edits a stream of host-local guide batches and hands outputs to ``sink``.

    Each batch (the schema of :mod:`sdedit_jax.data.guide_inputs`: ``id``,
    ``guide``, ``mask``, ``t0``, ``seed``, ``valid``, ``ok``) becomes global
    sharded arrays with ``jax.make_array_from_process_local_data``; the batch
    is dispatched asynchronously and its outputs are fetched by the sink's
    writer threads, so input prefetch (tf.data), compute and writes overlap.
    Every process must run the same number of batches; ``step_rule`` gives the
    per-example reverse step counts; ``conditioner`` (a text model's) tokenizes
    each batch's prompts on the host, so rows record whether they were truncated,
    and encodes them on device into the batch's ``cond`` (:mod:`sdedit_jax.jobs.text`).
    ``progress`` learns of each dispatched
    batch (the sink, built with ``on_written=progress.written``, of each image
    written). Closes ``sink`` at the end, so the reported time includes the
    last computations and writes.
    """
    rows_done = rows_failed = count = 0
    start = time.perf_counter()
    first_batch_seconds = 0.0
    for batch in batches:
        cond = None
        if conditioner is not None:
            batch = {**batch, **conditioner.columns(batch)}
            cond = conditioner.cond(batch)
        batch, global_batch = _with_step_counts(editor, batch, step_rule, cond)
        outputs = editor.run_global(placed_score, global_batch)
        valid = np.asarray(batch["valid"])
        if progress is not None:
            progress.dispatched(int(np.sum(valid)))
        if count == 0:
            outputs.block_until_ready()
            first_batch_seconds = time.perf_counter() - start
        sink.write_batch(batch, _LocalRows(outputs), fields=manifest_fields)
        count += 1
        rows_done += int(np.sum(valid & np.asarray(batch["ok"])))
        rows_failed += int(np.sum(valid & ~np.asarray(batch["ok"])))
    sink.close()
    return JobSummary(
        count, rows_done, rows_failed, time.perf_counter() - start, first_batch_seconds
    )


def _with_step_counts(
    editor: Editor, batch: dict[str, np.ndarray], step_rule: StepRule, cond: Any = None
) -> tuple[dict[str, np.ndarray], EditBatch]:
    """The host batch with its per-row ``steps`` and ``nfe``, and its global sharded arrays."""
    if batch["guide"].shape[0] * jax.process_count() != editor.global_batch:
        raise ValueError(
            f"batch: {batch['guide'].shape[0]} rows per host, but the mesh needs "
            f"{editor.global_batch // jax.process_count()} (per_device_batch x local devices)"
        )
    seeds = batch["seed"]
    if np.any((seeds < 0) | (seeds >= 2**31)):
        raise ValueError(f"seed: per-example seeds must lie in [0, 2^31), got {seeds}")
    n_steps = step_rule.steps_for(batch["t0"])
    calls = editor.sampler.network_calls(n_steps.astype(np.int64), editor.sde.noise_free_end)
    nfe = calls * editor.repeats
    batch = {**batch, "steps": n_steps, "nfe": nfe}

    def to_global(local):
        return jax.make_array_from_process_local_data(editor.batch_sharding, local)

    return batch, EditBatch(
        guides=to_global(batch["guide"]),
        seeds=to_global(seeds.astype(np.int32)),
        id_words=to_global(rng.string_id_words(batch["id"])),
        t0=to_global(batch["t0"]),
        n_steps=to_global(n_steps),
        mask=to_global(batch["mask"]),
        cond=jax.tree.map(to_global, cond),
    )
