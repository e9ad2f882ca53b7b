"""The tf.data stream of guide batches: host sharding, resume, padding, decoding in parallel."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from sdedit_jax.data.guide_inputs import micro, sources, text
from sdedit_jax.data.guide_inputs.catalog import (
    Catalog,
    _plain,
)
from sdedit_jax.data.guide_inputs.decode import (
    _decode_or_reason,
)
from sdedit_jax.data.guide_inputs.options import (
    T0_ROWS,
    GuideInputConfig,
    _as_config,
)


def build_catalog(config: GuideInputConfig | Mapping[str, Any]) -> Catalog:
    """Lists every example of the configured source in canonical order (reads no pixels).

    Rows get their text settings (:func:`text.resolve`) when the model takes prompts,
    and their micro-conditioning (:func:`micro.resolve`) when it is an SDXL model.

    Raises:
        ValueError: the source itself is unusable (missing folder or manifest,
            no TFRecord files); problems of single examples never raise.
    """
    config = _as_config(config)
    listed = sources.by_name()[config.source].list_examples(config)
    return micro.resolve(text.resolve(listed, config.text), config.micro)


def _decode_in_graph(element: dict, config: GuideInputConfig) -> dict:
    height, width = config.image_size
    guide, mask, has_mask, error = tf.numpy_function(
        _decode_or_reason(config),
        [
            element[k]
            for k in (
                "source",
                "guide_path",
                "mask_path",
                "guide_bytes",
                "mask_bytes",
                "record",
                "error",
            )
        ],
        [tf.float32, tf.float32, tf.bool, tf.string],
    )
    guide.set_shape([height, width, config.channels])
    mask.set_shape([height, width, 1])
    has_mask.set_shape([])
    error.set_shape([])
    return {"guide": guide, "mask": tf.where(has_mask, mask, tf.ones_like(mask)), "error": error}


def _example_seed(element: dict) -> tf.Tensor:
    """Generator seed from (seed, id) only, never from the position in the stream."""
    id_hash = tf.strings.to_hash_bucket_fast(element["id"], 2**63 - 1)
    return tf.stack([element["seed"], id_hash])


def _process(element: dict, config: GuideInputConfig) -> dict:
    """Decodes, applies the generator, and blanks failed rows."""
    decoded = _decode_in_graph(element, config)
    guide, mask, error = decoded["guide"], decoded["mask"], decoded["error"]
    generator = config.guide_generator
    if config.generator == "stroke_painting":
        guide = generator(guide, _example_seed(element))
    elif config.generator == "stroke_edit":
        guide, mask = generator(guide, _example_seed(element))
    elif config.generator == "composite":
        donor = _decode_in_graph(element["donor"], config)
        donor_failed = tf.strings.length(donor["error"]) > 0
        error = tf.where(
            (tf.strings.length(error) == 0) & donor_failed,
            "composite donor: " + donor["error"],
            error,
        )
        guide, mask = generator(guide, donor["guide"], _example_seed(element))
    guide = tf.ensure_shape(guide, [*config.image_size, config.channels])
    mask = tf.ensure_shape(mask, [*config.image_size, 1])
    ok = tf.strings.length(error) == 0
    return {
        **{name: element[name] for name in text.FIELDS + micro.FIELDS if name in element},
        "id": element["id"],
        "source": element["source"],
        "guide": tf.where(ok, guide, tf.zeros_like(guide)),
        "mask": tf.where(ok, mask, tf.zeros_like(mask)),
        "t0": tf.where(ok, element["t0"], tf.constant(config.t0, tf.float32)),
        "seed": element["seed"],
        "valid": tf.constant(True),
        "ok": ok,
        "error": error,
        "index": element["index"],
    }


def _padding_row(config: GuideInputConfig) -> dict:
    height, width = config.image_size
    padding_text = {}
    if config.text is not None:
        padding_text = {
            "prompt": tf.constant(""),
            "negative_prompt": tf.constant(""),
            "guidance_scale": tf.constant(config.text.guidance_scale, tf.float32),
        }
    if config.micro is not None:
        padding_text.update(
            {name: tf.constant(config.micro.default(name)) for name in config.micro.fields}
        )
    return {
        **padding_text,
        "id": tf.constant(""),
        "source": tf.constant(""),
        "guide": tf.zeros([height, width, config.channels]),
        "mask": tf.zeros([height, width, 1]),
        "t0": tf.constant(config.t0, tf.float32),
        "seed": tf.constant(config.seed, tf.int64),
        "valid": tf.constant(False),
        "ok": tf.constant(False),
        "error": tf.constant(""),
        "index": tf.constant(-1, tf.int64),
    }


def _rows_dataset(catalog: Catalog, indices: np.ndarray | None = None) -> tf.data.Dataset:
    """Catalog rows with their payload, in canonical order: all, or only ``indices``.

    Only catalogs without a payload can be sliced (a payload is a stream).
    """
    if indices is None:
        indices = np.arange(len(catalog), dtype=np.int64)
    columns = {k: v[indices] for k, v in catalog.columns.items()}
    columns = {
        k: tf.constant(v.tolist(), tf.string) if v.dtype == object else v
        for k, v in columns.items()
    }
    rows = tf.data.Dataset.from_tensor_slices(dict(columns, index=indices.astype(np.int64)))
    if catalog.payload is None:
        payload = tf.data.Dataset.from_tensors(
            {
                "record": tf.constant(b""),
                "guide_bytes": tf.constant(b""),
                "mask_bytes": tf.constant(b""),
            }
        ).repeat()
    else:
        payload = catalog.payload()
    return tf.data.Dataset.zip(rows, payload).map(_plain(lambda row, data: {**row, **data}))


def _done_mask(ids: np.ndarray, completed) -> np.ndarray:
    """Which ids are completed; ``completed`` is a collection or has a vectorised ``contains``
    (``manifest.CompletedIds``: hashes, so a million ids cost no million-string set)."""
    if hasattr(completed, "contains"):
        return np.asarray(completed.contains(ids), bool)
    completed = frozenset(completed)
    return np.fromiter((i in completed for i in ids.tolist()), bool, len(ids))


def global_num_steps(host_counts: Collection[int], batch_size_per_host: int) -> int:
    """Steps every host must run so that the host with the most examples finishes."""
    return max((math.ceil(c / batch_size_per_host) for c in host_counts), default=0)


@dataclasses.dataclass(frozen=True)
class GuideStream:
    """One host's batches of a job.

    Attributes:
        dataset: exactly ``num_steps`` batches, each a dict of
            ``batch_size`` rows: ``id``, ``source``, ``error`` (tf.string),
            ``guide`` [B,H,W,C] and ``mask`` [B,H,W,1] (float32), ``t0``
            (float32), ``seed`` and ``index`` (int64, canonical position, -1 on
            padding), ``valid`` (False on padding) and ``ok`` (False on
            padding and failed examples); with a model that takes text also
            ``prompt``, ``negative_prompt`` (tf.string) and ``guidance_scale``
            (float32; see :mod:`.text`); with an SDXL model the micro-conditioning
            fields it reads (float32 ``[B, 2]`` pairs, ``[B]`` scores; see :mod:`.micro`).
        num_steps: batches per host, equal on every host.
        batch_size: rows per batch on this host.
        host_counts: examples left to do on each host.
        process_index: this host.
        total_examples: examples of the source in this stream's ``t0_rows`` (all hosts,
            done or not).
        num_skipped: examples skipped because they were completed (all hosts).
    """

    dataset: tf.data.Dataset
    num_steps: int
    batch_size: int
    host_counts: tuple[int, ...]
    process_index: int
    total_examples: int
    num_skipped: int

    @property
    def num_examples(self) -> int:
        """Examples this job will process, all hosts together."""
        return sum(self.host_counts)

    @property
    def local_examples(self) -> int:
        """Examples this host will process (the rest of its rows are padding)."""
        return self.host_counts[self.process_index]


def make_guide_dataset(
    config: GuideInputConfig | Mapping[str, Any],
    *,
    batch_size_per_host: int,
    process_index: int | None = None,
    process_count: int | None = None,
    completed: Collection[str] = frozenset(),
    num_steps: int | None = None,
    catalog: Catalog | None = None,
    t0_rows: str = "all",
) -> GuideStream:
    """Builds this host's stream of guide batches.

    Args:
        config: a ``GuideInputConfig`` or a mapping of its fields.
        batch_size_per_host: rows per batch on this host.
        process_index, process_count: this host and the number of hosts
            (default: ``jax.process_index()``, ``jax.process_count()``).
        completed: ids already done (``manifest.completed_index``, or any collection); they are
            skipped before batching. Every host must pass the same set for
            the hosts to agree on ``num_steps``; read it before any host writes,
            or agree on the step count across hosts and pass ``num_steps``.
        num_steps: batches to yield (default: the least that serves every
            host); more steps add padding batches.
        catalog: a prebuilt ``build_catalog(config)`` (avoids listing twice).
        t0_rows: which examples this stream holds (see ``T0_ROWS``): ``"all"``,
            ``"configured"`` (those without their own t0, edited at
            ``config.t0``) or ``"own"`` (those whose input names a t0).

    Returns:
        The host's ``GuideStream``.
    """
    config = _as_config(config)
    if batch_size_per_host < 1:
        raise ValueError(f"batch_size_per_host: must be >= 1, got {batch_size_per_host}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: {process_index} not in [0, {process_count})")
    catalog = build_catalog(config) if catalog is None else catalog
    if t0_rows not in T0_ROWS:
        raise ValueError(f"t0_rows: expected one of {T0_ROWS}, got {t0_rows!r}")
    selected = {
        "all": np.ones(len(catalog), bool),
        "configured": ~catalog.columns["t0_given"],
        "own": catalog.columns["t0_given"],
    }[t0_rows]
    # Rows outside the selection count as neither to do nor done.
    done = _done_mask(catalog.columns["id"], completed) & selected
    left = ~done & selected
    owner = np.arange(len(catalog)) % process_count
    host_counts = tuple(int(np.sum(left & (owner == p))) for p in range(process_count))
    needed = global_num_steps(host_counts, batch_size_per_host)
    if num_steps is None:
        num_steps = needed
    elif num_steps < needed:
        raise ValueError(f"num_steps: {num_steps} is fewer than the {needed} steps needed")

    mine = left & (owner == process_index)
    if catalog.payload is None:
        # Resume: the rows to do are picked in numpy; filtering a million finished rows
        # through tf.data would cost a minute before the first batch.
        indices = np.flatnonzero(mine)
        rows = _rows_dataset(catalog, indices)
        if config.generator == "composite":
            donors = _rows_dataset(catalog, (indices + 1) % len(catalog))
            rows = tf.data.Dataset.zip(rows, donors).map(
                _plain(lambda row, donor: {**row, "donor": donor})
            )
    else:
        keep = tf.constant(mine)
        rows = _rows_dataset(catalog)
        if config.generator == "composite":
            donors = rows.skip(1).concatenate(rows.take(1))
            rows = tf.data.Dataset.zip(rows, donors).map(
                _plain(lambda row, donor: {**row, "donor": donor})
            )
        rows = rows.filter(_plain(lambda row: tf.gather(keep, row["index"])))
    dataset = (
        rows.map(
            _plain(lambda row: _process(row, config)),
            num_parallel_calls=config.num_parallel_calls,
            deterministic=True,
        )
        .concatenate(tf.data.Dataset.from_tensors(_padding_row(config)).repeat())
        .batch(batch_size_per_host, drop_remainder=True)
        .take(num_steps)
        .prefetch(config.prefetch_batches)
    )
    options = tf.data.Options()
    options.deterministic = True
    return GuideStream(
        dataset=dataset.with_options(options),
        num_steps=num_steps,
        batch_size=batch_size_per_host,
        host_counts=host_counts,
        process_index=process_index,
        total_examples=int(selected.sum()),
        num_skipped=int(done.sum()),
    )


def preview_examples(
    config: GuideInputConfig | Mapping[str, Any], catalog: Catalog, ids: Collection[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{id: (guide, mask)}`` of the good examples among ``ids``, exactly as a job sees them.

    Runs the job's own pipeline (generators included) on just these rows, so
    a contact sheet can be rebuilt after a resume without keeping guides around.
    """
    wanted = frozenset(ids)
    stream = make_guide_dataset(
        config,
        batch_size_per_host=max(1, len(wanted)),
        process_index=0,
        process_count=1,
        completed=frozenset(catalog.ids) - wanted,
        catalog=catalog,
    )
    found = {}
    for batch in stream.dataset.as_numpy_iterator():
        for row, example_id in enumerate(batch["id"]):
            if batch["valid"][row] and batch["ok"][row]:
                found[example_id.decode()] = (batch["guide"][row], batch["mask"][row])
    return found
