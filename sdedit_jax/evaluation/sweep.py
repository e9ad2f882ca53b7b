"""The sweep: edit and score every (variant, task, t0), resumable; ``run_evaluation`` drives it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import tqdm
from clu import metric_writers

from sdedit_jax import engine, pretrained
from sdedit_jax.evaluation.inputs import (
    BASELINE_VARIANT,
    ImageSet,
    Variant,
    check_t0s,
    load_guides,
    load_reference,
    variants_from_config,
    with_samples,
)
from sdedit_jax.evaluation.report import (
    contact_rows,
    csv_text,
    table_text,
    write_outputs,
)
from sdedit_jax.evaluation.scoring import (
    Scorer,
    reference_features,
)
from sdedit_jax.metrics import realism
from sdedit_jax.rng import string_id_words
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.util import files, metric_log
from sdedit_jax.util.progress import Progress

REFERENCE_CACHE = "reference_features.npz"


def _save_npz(path: str, outputs: np.ndarray, seconds: float) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, outputs=outputs, seconds=np.float64(seconds))
    files.publish_bytes(path, buffer.getvalue())


def _load_npz(path: str) -> tuple[np.ndarray, float]:
    with np.load(path) as saved:
        return saved["outputs"], float(saved["seconds"])


def edit_guides(
    editor: engine.Editor,
    placed,
    guides: ImageSet,
    t0: float,
    n_steps: int,
    seed: int,
    progress: Progress,
    cache_path: str | None = None,
) -> tuple[np.ndarray, float]:
    """(outputs, editing seconds) of every guide at one ``t0``, ``editor.global_batch`` rows
    at a time.

    With ``cache_path`` the setting is resumable: a finished setting is read
    back from that file, and while it runs each finished batch is kept next to
    it (``<key>.from<row>.npz``, merged into the file at the end), so a stopped
    sweep loses at most one batch, not the whole setting. Outputs read back are
    bit-identical to recomputed ones (editing is deterministic); the seconds are
    those of the run that made them.
    """
    if cache_path is not None and os.path.exists(cache_path):
        progress.skip(len(guides.ids))
        return _load_npz(cache_path)
    words = string_id_words([f"{guides.name}/{i}" for i in guides.ids])
    outputs, seconds, parts = [], 0.0, []
    for start in range(0, len(guides.ids), editor.global_batch):
        rows = slice(start, start + editor.global_batch)
        count = len(guides.ids[rows])
        part = None if cache_path is None else f"{cache_path[:-4]}.from{start:07d}.npz"
        if part is not None and os.path.exists(part):
            chunk, chunk_seconds = _load_npz(part)
            progress.skip(count)
        else:
            began = time.perf_counter()
            batch = engine.EditBatch(
                guides=guides.images[rows],
                seeds=np.full((count,), seed, np.int32),
                id_words=words[rows],
                t0=np.full((count,), t0, np.float32),
                n_steps=np.full((count,), n_steps, np.int32),
                mask=guides.masks[rows],
            )
            chunk = np.asarray(editor.run(placed, batch))
            chunk_seconds = time.perf_counter() - began
            if part is not None:
                _save_npz(part, chunk, chunk_seconds)
            progress.add(count)
        outputs.append(chunk)
        seconds += chunk_seconds
        parts.append(part)
    outputs = np.concatenate(outputs)
    if cache_path is not None:
        _save_npz(cache_path, outputs, seconds)
        for part in parts:
            os.remove(part)
    return outputs, seconds


def _scores(scorer: Scorer, outputs: np.ndarray, guides: ImageSet, cache_path: str | None) -> dict:
    """The setting's scores; with ``cache_path`` kept next to its outputs and read back by a
    rerun, as feature extraction can cost more than few-step sampling on a CPU."""
    if cache_path is None:
        return scorer(outputs, guides)
    path = f"{cache_path[:-4]}.scores.{scorer.fingerprint}.json"
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    scores = scorer(outputs, guides)
    files.publish_bytes(path, json.dumps(scores).encode())
    return scores


def _row(
    task: str,
    variant: str,
    t0: float,
    n_steps: int,
    count: int,
    scores: dict,
    seconds: float | None,
    nfe: int = 0,
) -> dict:
    rate = None if not seconds else round(count / seconds, 3)
    return {
        "task": task,
        "variant": variant,
        "t0": t0,
        "n_steps": n_steps,
        "nfe": nfe,
        "examples": count,
        **scores,
        "seconds": None if seconds is None else round(seconds, 3),
        "images_per_s": rate,
    }


def write_scores(writer: metric_writers.MetricWriter, row: dict) -> None:
    """One setting's realism and faithfulness as TensorBoard scalars, at step 1000 * t0.

    Tags are ``<task>/<variant>/<score>``, so each curve over t0 is one plot line.
    """
    writer.write_scalars(
        round(1000 * row["t0"]),
        {
            f"{row['task']}/{row['variant']}/{score}": row[score]
            for score in ("kid", "fid", "l2")
            if row.get(score) is not None
        },
    )


def _log(message: str) -> None:
    tqdm.tqdm.write(message, file=sys.stderr)  # above the progress bar, not through it


def _settings(sampler: Sampler) -> dict:
    """The sampler's description with its grid as given ("" = the solver's own).

    As earlier releases keyed their caches and listed their variants (``grid_used`` beside).
    """
    return {**sampler.description(), "time_grid": sampler.time_grid}


def _setting_key(
    model: pretrained.LoadedModel,
    variant: Variant,
    guides: ImageSet,
    t0: float,
    n_steps: int,
    seed: int,
) -> str:
    """A digest of everything one setting's outputs depend on (the resume cache's key)."""
    spec = {
        "model": model.checksum,
        "sampler": _settings(variant.sampler),
        "repeats": variant.repeats,
        "task": guides.name,
        "t0": t0,
        "n_steps": n_steps,
        "seed": seed,
        "ids": guides.ids,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(guides.images).tobytes())
    digest.update(np.ascontiguousarray(guides.masks).tobytes())
    return digest.hexdigest()[:24]


def sweep(
    model: pretrained.LoadedModel,
    variants: list[Variant],
    task_guides: list[ImageSet],
    t0s: tuple[float, ...],
    config: ml_collections.ConfigDict,
    scorer: Scorer,
    progress_writer: metric_writers.MetricWriter | None = None,
    cache_dir: str | None = None,
    on_row: Callable[[list[dict]], None] | None = None,
) -> tuple[list[dict], dict]:
    """Edits and scores every (variant, task, t0); returns (rows, contact-sheet cells per curve).

    Progress (images edited, images/s) goes to a bar and to ``progress_writer``
    (closed at the end). With ``cache_dir``, each setting's outputs are kept
    there and reused by a rerun; ``on_row(rows so far)`` is called after each setting.
    """
    editors = [
        engine.Editor(model.sde, v.sampler, v.repeats, per_device_batch=config.per_device_batch)
        for v in variants
    ]
    total_rows = len(variants) * len(t0s) * sum(len(g.ids) for g in task_guides)
    rows, sheets = [], {}
    with Progress(total_rows, progress_writer, label="evaluate") as progress:
        for variant, editor in zip(variants, editors, strict=True):
            placed = editor.place_score(model.score_fn)
            for guides in task_guides:
                kept = {}
                for t0 in t0s:
                    # The config's float64 t0: float32(0.8) * 200 rounds up to 161 steps.
                    n_steps = int(variant.step_rule.steps_for(np.float64(t0)))
                    cache_path = None
                    if cache_dir is not None:
                        key = _setting_key(model, variant, guides, t0, n_steps, config.seed)
                        cache_path = os.path.join(cache_dir, f"{key}.npz")
                    outputs, seconds = edit_guides(
                        editor, placed, guides, t0, n_steps, config.seed, progress, cache_path
                    )
                    calls = variant.sampler.network_calls(n_steps, model.sde.noise_free_end)
                    nfe = calls * variant.repeats
                    rows.append(
                        _row(
                            guides.name,
                            variant.name,
                            t0,
                            n_steps,
                            len(guides.ids),
                            _scores(scorer, outputs, guides, cache_path),
                            seconds,
                            nfe,
                        )
                    )
                    if on_row is not None:
                        on_row(rows)
                    kept[t0] = outputs[: config.contact_sheet_examples]
                    _log(
                        f"[{guides.name} {variant.name} t0={t0:g}] {len(guides.ids)} images, "
                        f"{n_steps} steps, {seconds:.1f}s ({len(guides.ids) / seconds:.2f} img/s)"
                    )
                sheets[(guides.name, variant.name)] = contact_rows(
                    guides, kept, config.contact_sheet_examples
                )
    return rows, sheets


def run_evaluation(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: pretrained.LoadedModel | None = None,
    extractor: realism.FeatureExtractor | None = None,
) -> dict:
    """Runs the whole sweep and writes every output to ``workdir``; returns ``results.json``'s dict.

    Args:
        config: an evaluation config (see ``configs/eval_emoji.py``).
        workdir: output folder (created).
        model: a loaded model to use instead of ``config.model_dir`` (tests pass
            analytic score functions this way).
        extractor: realism features to use instead of ``config.feature_extractor``.
    """
    if jax.process_count() != 1:
        raise ValueError("evaluate: runs in a single process; start it without jax.distributed")
    started = time.perf_counter()
    files.makedirs(workdir)
    model = pretrained.load_model(config.model_dir) if model is None else model
    t0s = check_t0s(config.t0s, model.sde)
    variants = variants_from_config(config)
    if not config.tasks:
        raise ValueError("config.tasks: give at least one guide generator")
    samples = config.get("samples_per_guide", 1)
    task_guides = [
        with_samples(load_guides(config, task, model.image_size, model.num_channels), samples)
        for task in config.tasks
    ]
    reference = load_reference(config, model.image_size, model.num_channels)
    if extractor is None:
        extractor = realism.load_feature_extractor(
            config.feature_extractor, config.feature_weights_path or None
        )
    reference_feats, cache_hit = reference_features(
        extractor, reference, os.path.join(workdir, REFERENCE_CACHE), config.feature_batch_size
    )
    _log(
        f"[evaluate] {len(reference.ids)} reference images "
        f"({'cached' if cache_hit else 'computed'} features), "
        f"{', '.join(f'{g.name}: {len(g.ids)}' for g in task_guides)} guides"
    )
    smallest = min([len(reference.ids)] + [len(g.ids) for g in task_guides])
    scorer = Scorer(
        extractor,
        reference_feats,
        realism.stats_from_features(reference_feats),
        jax.random.key(config.seed),
        min(config.kid.subset_size, smallest),
        config.kid.num_subsets,
        config.feature_batch_size,
    )
    baselines = [
        _row(g.name, BASELINE_VARIANT, 0.0, 0, len(g.ids), scorer(g.images, g), None)
        for g in task_guides
    ]
    cache_dir = os.path.join(workdir, "outputs")
    os.makedirs(cache_dir, exist_ok=True)

    board = os.path.join(workdir, "tensorboard")
    scores_writer = metric_writers.SummaryWriter(os.path.join(board, "scores"))

    def on_row(rows):
        files.publish_bytes(
            os.path.join(workdir, "results.partial.csv"), csv_text(baselines + rows).encode()
        )
        write_scores(scores_writer, rows[-1])

    progress_writer = metric_log.metric_writer(
        os.path.join(workdir, "throughput.jsonl"), os.path.join(board, "progress")
    )
    rows, sheets = sweep(
        model, variants, task_guides, t0s, config, scorer, progress_writer, cache_dir, on_row
    )
    scores_writer.close()
    results = {
        "workdir": workdir,
        "config": config.to_dict(),
        "model": {"path": model.path, "sha256": model.checksum, "sde": type(model.sde).__name__},
        "feature_extractor": extractor.name,
        "reference_images": len(reference.ids),
        "reference_cache_hit": cache_hit,
        "kid_subset_size": scorer.kid_subset_size,
        "variants": [
            {
                "name": v.name,
                **_settings(v.sampler),
                "repeats": v.repeats,
                "grid_used": v.sampler.grid_name,
                "nfe_per_step": v.sampler.nfe_per_step,
            }
            for v in variants
        ],
        "rows": baselines + rows,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_outputs(workdir, results, sheets)
    print(table_text(results["rows"]))
    return results
