"""A batch edit job: guides in, edited images + manifests + contact sheet out.

:func:`run_job` is what ``python -m sdedit_jax.main`` runs; see that module for
the command line and the output layout. The configuration is checked in
:mod:`sdedit_jax.jobs.checks`, the sub-jobs and the dry run are
:mod:`sdedit_jax.jobs.plan`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from sdedit_jax import engine, pretrained
from sdedit_jax.data import guide_inputs
from sdedit_jax.jobs import (
    checks,
    contact_sheet,
    fingerprint,
    manifest,
    plan,
    preflight,
    sinks,
    text,
    workdir_lock,
)
from sdedit_jax.jobs.checks import ConfigError, JobConfig
from sdedit_jax.jobs.plan import PER_EXAMPLE_FOLDER, PreparedJob
from sdedit_jax.jobs.stream import run_stream
from sdedit_jax.sampling.sampler import Sampler, sampler_from_config
from sdedit_jax.util import files, metric_log
from sdedit_jax.util.progress import Progress

SUMMARY = "summary.json"


def job_fingerprint(
    config: JobConfig,
    model: pretrained.LoadedModel,
    sampler: Sampler,
    t0s: list[float],
    inputs: guide_inputs.GuideInputConfig,
) -> dict:
    """Everything that determines this job's outputs (see :mod:`sdedit_jax.jobs.fingerprint`)."""
    steps = config.sampler
    step_rule = (
        {"steps_per_unit_time": steps["steps_per_unit_time"]}
        if steps["steps_per_unit_time"]
        else {"n_steps": steps["n_steps"]}
    )
    return fingerprint.job_fingerprint(
        model_sha256=model.checksum,
        model=model.description,
        sde={"type": type(model.sde).__name__, **_scalar_fields(model.sde)},
        sampler=sampler.description(),
        step_rule=step_rule,
        repeats=config.repeats,
        seed=config.seed,
        t0s=t0s,
        t0_rule=(
            "inputs naming their own t0 are edited once at it, in "
            f"{PER_EXAMPLE_FOLDER}/; others at each of t0s"
        ),
        image_size=inputs.image_size,
        channels=inputs.channels,
        guides={
            "resize": inputs.resize,
            "generator": inputs.generator,
            "generator_kwargs": json.loads(
                json.dumps(inputs.generator_kwargs, sort_keys=True, default=str)
            ),
        },
        output={"png": config.output.png, "npz": config.output.npz},
        text=None if inputs.text is None else _text_fingerprint(inputs.text),
        codec=None if inputs.text is None else dataclasses.asdict(config.latent),
        micro_conditioning=dataclasses.asdict(config.sdxl)
        if checks.takes_micro_conditioning(model)
        else None,
    )


def _text_fingerprint(text: guide_inputs.TextInputs) -> dict:
    return {
        **dataclasses.asdict(text),
        "rule": "a manifest row's own text fields or a folder guide's <name>.txt caption, "
        "else these",
    }


def _scalar_fields(value) -> dict:
    fields = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {}
    return {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool))}


def run_job(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
) -> dict:
    """Runs every sub-job of ``config``; returns the job summary (also in summary.json).

    The whole configuration, the model against the inputs, the input source
    and the workdir (writable; made by this configuration, see
    :mod:`sdedit_jax.jobs.fingerprint`) are checked before any work
    (:class:`ConfigError`); the workdir is locked against a second launch
    (:class:`workdir_lock.WorkdirBusy`). ``summary.json`` describes the whole
    workdir (every invocation); the returned dict adds what this invocation
    did under ``this_run``.

    Args:
        retry_failed: try the inputs listed in ``failures.jsonl`` again.
        dry_run: write nothing; print (and return under ``"plan"``) what each
            sub-job would edit and skip, and why.
    """
    if not isinstance(workdir, str) or not workdir.strip():
        raise ConfigError(f"workdir: got {workdir!r}; expected a folder (local or gs://)")
    job = checks.check_config(config)
    if files.is_local(workdir) and os.path.isfile(workdir):
        raise checks.field_error("workdir", workdir, "a folder (this is a file)")
    t0s = list(job.t0s)
    sampler, step_rule = sampler_from_config(job.sampler)
    # Weights go straight to where the editor replicates them, one tensor at a time.
    replicated = NamedSharding(engine.data_mesh(), PartitionSpec())
    model = checks.load_model(job.model_dir, replicated)
    text = checks.text_inputs(job, model)
    checks.check_model(model, job.input_config(t0s[0], model_size=model.image_size), t0s)
    checks.check_batch(job.per_device_batch, model)
    size = job.input_config(t0s[0], model_size=model.image_size).image_size
    micro = checks.micro_inputs(job, model, size)
    inputs = {t0: job.input_config(t0, model.sde, model.image_size, text, micro) for t0 in t0s}
    catalog = checks.build_catalog(inputs[t0s[0]])
    try:  # before anything is compiled or written: guides none of which the model takes
        preflight.check_guide_sizes(inputs[t0s[0]], catalog, job.model_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not dry_run:
        # After the checks above, so a configuration error leaves no workdir behind;
        # a gs:// path without credentials still fails here, before any work.
        files.check_writable(workdir)
    process, n_processes = jax.process_index(), jax.process_count()
    job_print = job_fingerprint(job, model, sampler, t0s, inputs[t0s[0]])
    try:
        fingerprint.check_or_record(workdir, job_print, overwrite=job.overwrite, record=False)
    except fingerprint.FingerprintMismatch as e:
        raise ConfigError(str(e)) from None
    prepared = PreparedJob(job, workdir, t0s, inputs, catalog, model, sampler, step_rule)
    if dry_run:
        return plan.plan_job(prepared, retry_failed)
    try:
        lock = workdir_lock.acquire(workdir, process)
    except workdir_lock.LinkInWorkdir as e:
        raise ConfigError(str(e)) from None
    with lock:
        try:
            # The whole workdir, before any work: no link anywhere (see sinks.remove_orphan_temps).
            sinks.remove_orphan_temps(workdir, process)
        except workdir_lock.LinkInWorkdir as e:
            raise ConfigError(str(e)) from None
        if process == 0:
            fingerprint.check_or_record(workdir, job_print, overwrite=job.overwrite)
        multihost_utils.sync_global_devices("workdir fingerprint")
        return _run_locked(prepared, retry_failed, process, n_processes)


def _run_locked(prepared: PreparedJob, retry_failed: bool, process: int, n_processes: int) -> dict:
    config, workdir, t0s = prepared.config, prepared.workdir, prepared.t0s
    inputs, catalog, model = prepared.inputs, prepared.catalog, prepared.model
    sampler, step_rule = prepared.sampler, prepared.step_rule
    editor = engine.Editor(
        model.sde, sampler, config.repeats, per_device_batch=config.per_device_batch
    )
    conditioner, codec = None, None
    if checks.takes_text(model):
        scales = catalog.columns["guidance_scale"][catalog.columns["error"] == ""]
        conditioner = text.conditioner_for(model, with_negative=bool(np.any(scales > 1)))
        codec = model.codec_with(config.latent.posterior, config.latent.mask_downsample)
    placed = editor.place_score(model.score_fn, codec)
    subdirs, this_run, totals = {}, [], []
    # Each manifest row also gets its own reverse "steps" and network calls "nfe"
    # (nfe_per_step * steps * repeats), from the engine.
    job_fields = {
        "sde": type(model.sde).__name__,
        **sampler.manifest_fields(),
        "steps_per_unit_time": config.sampler["steps_per_unit_time"],
        "n_steps": config.sampler["n_steps"],
        "repeats": config.repeats,
        "model_sha256": model.checksum,
    }
    for job in plan.sub_jobs(t0s, catalog):
        sub = files.join(workdir, job.folder)
        at_t0 = plan.catalog_at(catalog, job.t0)
        digests = manifest.DigestTable(at_t0.columns)
        completed = manifest.completed_index(sub, retry_failed=retry_failed)
        changed = plan.changed_inputs(sub, at_t0, job, digests, completed, process, n_processes)
        # Every host must see the same finished set before anyone writes more.
        multihost_utils.sync_global_devices(f"read completed {sub}")
        stream = guide_inputs.make_guide_dataset(
            inputs.get(job.t0, inputs[t0s[0]]),
            batch_size_per_host=editor.global_batch // n_processes,
            completed=completed,
            catalog=at_t0,
            t0_rows=job.t0_rows,
        )
        print(
            f"[{job.folder}] images: {stream.num_examples} to edit, {stream.num_skipped} "
            f"already done, in {stream.num_steps} batch{'' if stream.num_steps == 1 else 'es'} "
            f"of {editor.global_batch}",
            file=sys.stderr,
            flush=True,
        )
        progress = Progress(
            stream.local_examples,
            metric_log.metric_writer(
                files.join(sub, f"throughput.p{process:05d}.jsonl"),
                files.join(workdir, "tensorboard", job.folder) if process == 0 else None,
            ),
            label=job.folder,
            every_s=config.progress_every_s,
        )
        with (
            progress,
            sinks.Sink(
                sub,
                process_index=process,
                job_fields=job_fields,
                png=config.output.png,
                npz=config.output.npz,
                png_compression=config.output.png_compression,
                num_threads=config.output.writer_threads,
                on_written=progress.written,
                input_digests=digests,
            ) as sink,
        ):
            for example_id, source, field, reason in changed:
                sink.write_failure(
                    id=example_id, source=source, reason=reason, inputs_changed=field
                )
            summary = run_stream(
                editor,
                placed,
                stream.dataset.as_numpy_iterator(),
                sink,
                step_rule=step_rule,
                progress=progress,
                conditioner=conditioner,
            )
        multihost_utils.sync_global_devices(f"wrote {sub}")
        subdirs[job.label] = sub
        if process == 0:
            final = manifest.finalize(sub)
            totals.append(
                {
                    "t0": job.t0 if job.t0_rows == "configured" else None,
                    "folder": job.folder,
                    "edited": final.manifest_rows,
                    "failed": final.failure_rows,
                    "remaining": stream.total_examples
                    - final.manifest_rows
                    - final.failure_rows
                    + final.changed_inputs,
                }
            )
        this_run.append(
            {
                "folder": job.folder,
                "batches": summary.batches,
                "edited": summary.rows_done,
                "seconds": round(summary.seconds, 2),
                "first_batch_seconds": round(summary.first_batch_seconds, 2),
                "images_per_s": round(summary.images_per_second, 3),
                "skipped_done": stream.num_skipped,
            }
        )
    run = {"devices": jax.device_count(), "processes": n_processes, "sub_jobs": this_run}
    if process != 0:
        return {"workdir": workdir, "failures": None, "this_run": run}
    result = {
        "model_sha256": model.checksum,
        "inputs": len(catalog),
        "sub_jobs": totals,
        "edited": sum(s["edited"] for s in totals),
        "failures": sum(s["failed"] for s in totals),
        "complete": all(s["remaining"] == 0 for s in totals),
        "contact_sheet": None,
    }
    if config.contact_sheet:
        sheet = contact_sheet.write(workdir, subdirs, inputs[t0s[0]], catalog)
        result["contact_sheet"] = None if sheet is None else contact_sheet.FILE
    sinks.atomic_write_bytes(files.join(workdir, SUMMARY), json.dumps(result, indent=1).encode())
    return {"workdir": workdir, **result, "this_run": run}
