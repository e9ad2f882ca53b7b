"""A batch edit job: guides in, edited images + manifests + contact sheet out.

:func:`run_job` is what ``python -m sdedit_jax.main`` runs; see that module for
the command line and the output layout.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import sys
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from sdedit_jax import engine, pretrained
from sdedit_jax.data import guide_inputs, image_grid, images
from sdedit_jax.jobs import fingerprint, preflight, row_inputs, sinks, workdir_lock
from sdedit_jax.jobs.stream import run_stream
from sdedit_jax.sampling.sampler import Sampler, sampler_from_config
from sdedit_jax.sampling.steps import StepRule
from sdedit_jax.sde import SDE
from sdedit_jax.util import config as config_files
from sdedit_jax.util import files, metric_log
from sdedit_jax.util.progress import Progress

# Seconds between progress reports when a config has no ``progress_every_s``.
PROGRESS_EVERY_S = 10.0


class ConfigError(ValueError):
    """A configuration or startup problem; the message is one line naming field, value, rule."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (
        isinstance(value, (int, float, np.number))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: got {value!r}; expected {allowed}")


def _prefixed(error: Exception, prefix: str) -> ConfigError:
    """A field-naming ValueError (``"name: ..."``) re-raised under ``config.<prefix>``."""
    text = " ".join(str(error).split())
    head, sep, _ = text.partition(": ")
    dotted = sep and head.replace("_", "").replace(".", "").isalnum()
    return ConfigError(f"config.{prefix}.{text}" if dotted else f"config.{prefix}: {text}")


@functools.cache
def _default_config() -> ml_collections.ConfigDict:
    return config_files.load_config("configs/default.py")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates every field the job reads, before any work (raises :class:`ConfigError`).

    A key that ``configs/default.py`` (which lists every field) lacks is refused.
    """
    unknown = config_files.first_unknown(config, _default_config())
    if unknown:
        raise ConfigError(unknown)
    t0s = config.t0s
    allowed_t0s = "a non-empty tuple of distinct start times in (0, 1], e.g. (0.3, 0.5)"
    _require(isinstance(t0s, (tuple, list)) and len(t0s) > 0, "t0s", t0s, allowed_t0s)
    for t0 in t0s:
        _require(_is_real(t0) and 0 < t0 <= 1, "t0s", t0s, allowed_t0s + f" ({t0!r} is not)")
    as_float32 = {float(np.float32(t0)) for t0 in t0s}
    _require(len(as_float32) == len(t0s), "t0s", t0s, allowed_t0s + " (distinct as float32)")
    sampler = config.sampler
    for name in ("steps_per_unit_time", "n_steps", "max_steps"):
        _require(
            _is_int(sampler[name]) and sampler[name] >= 0,
            f"sampler.{name}",
            sampler[name],
            "an int >= 0 (0 = unset)",
        )
    _require(
        _is_int(config.repeats) and config.repeats >= 1,
        "repeats",
        config.repeats,
        "an int >= 1 (SDEdit's K)",
    )
    _require(
        _is_int(config.seed) and 0 <= config.seed < 2**31,
        "seed",
        config.seed,
        "an int in [0, 2^31)",
    )
    _require(
        _is_int(config.per_device_batch) and config.per_device_batch >= 1,
        "per_device_batch",
        config.per_device_batch,
        "an int >= 1",
    )
    _require(
        isinstance(config.contact_sheet, bool),
        "contact_sheet",
        config.contact_sheet,
        "True or False",
    )
    _require(
        isinstance(config.model_dir, str) and bool(config.model_dir),
        "model_dir",
        config.model_dir,
        "a model folder, or 'default' for the shipped model",
    )
    try:
        sampler_from_config(sampler)
    except ValueError as e:
        raise _prefixed(e, "sampler") from None
    for t0 in t0s:
        input_config(config, t0)
    check_output_config(config)


def check_output_config(config: ml_collections.ConfigDict) -> None:
    """Validates ``config.output`` and ``config.overwrite`` (raises :class:`ConfigError`)."""
    output = config.output
    _require(isinstance(output.png, bool), "output.png", output.png, "True or False")
    _require(output.npz in sinks.NPZ_MODES, "output.npz", output.npz, f"one of {sinks.NPZ_MODES}")
    _require(
        output.png or output.npz != "none",
        "output.png",
        output.png,
        "True, unless output.npz is 'per_example' or 'shards' (a job needs an output)",
    )
    _require(
        _is_int(output.png_compression) and 0 <= output.png_compression <= 9,
        "output.png_compression",
        output.png_compression,
        "an int in 0..9 (zlib level: 1 is fast, 9 is smallest)",
    )
    threads = output.writer_threads
    _require(
        threads is None or (_is_int(threads) and threads >= 1),
        "output.writer_threads",
        threads,
        "None (one per CPU core) or an int >= 1",
    )
    _require(isinstance(config.overwrite, bool), "overwrite", config.overwrite, "True or False")
    every_s = config.get("progress_every_s", PROGRESS_EVERY_S)
    _require(
        _is_real(every_s) and every_s > 0,
        "progress_every_s",
        every_s,
        "seconds > 0 between progress reports",
    )


def input_config(
    config: ml_collections.ConfigDict,
    t0: float,
    sde: SDE | None = None,
    model_size: int | None = None,
) -> guide_inputs.GuideInputConfig:
    """The guide input config of the sub-job at ``t0`` (raises :class:`ConfigError`).

    With the model's ``sde``, per-example t0s must lie in its ``(eps, T]``;
    ``input.image_size`` None means the model's ``model_size`` (before the model
    is loaded any size stands in, to check the other fields).
    """
    domain = {} if sde is None else {"time_domain": (float(sde.eps), float(sde.T))}
    size = config.input.image_size
    size = (model_size or 1) if size is None else size
    try:
        return guide_inputs.GuideInputConfig.from_mapping(
            dict(config.input.to_dict(), image_size=size, t0=float(t0), seed=config.seed, **domain)
        )
    except (ValueError, TypeError) as e:
        raise _prefixed(e, "input") from None


def check_model(
    model: pretrained.LoadedModel, inputs: guide_inputs.GuideInputConfig, t0s: Iterable[float]
) -> None:
    """The inputs must have the model's size and channels, t0s must lie above the SDE's eps."""
    size = (model.image_size, model.image_size)
    _require(
        tuple(inputs.image_size) == size,
        "input.image_size",
        inputs.image_size,
        f"{size}, the size of the model in {model.path}",
    )
    _require(
        inputs.channels == model.num_channels,
        "input.channels",
        inputs.channels,
        f"{model.num_channels}, the channels of the model in {model.path}",
    )
    for t0 in t0s:
        _require(
            t0 > model.sde.eps,
            "t0s",
            tuple(t0s),
            f"values above the model SDE's eps={model.sde.eps}",
        )


# Image-sized float32 arrays one row of a compiled step holds at least (guide, mask,
# state, noise, score, ...); the network's own activations come on top.
ARRAYS_PER_ROW = 8


def device_memory(device: jax.Device) -> tuple[int, str]:
    """Bytes one device may use and where the figure comes from.

    Accelerators report their limit; CPU devices share the host's physical memory.
    """
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} device memory"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shares = max(1, jax.local_device_count())
    return host // shares, f"host memory / {shares} local devices"


def check_batch(per_device_batch: int, model: pretrained.LoadedModel) -> None:
    """The rule for ``per_device_batch``: its rows' images must fit on one device.

    ``per_device_batch * ARRAYS_PER_ROW * H * W * C * 4 bytes <= device memory`` (a
    lower bound of what a step needs, so a batch that fails it can never run; one
    that passes may still need more for the network's activations).
    """
    row = ARRAYS_PER_ROW * model.image_size**2 * model.num_channels * 4
    memory, where = device_memory(jax.local_devices()[0])
    _require(
        per_device_batch * row <= memory,
        "per_device_batch",
        per_device_batch,
        f"at most {memory // row} for this model: each row holds {ARRAYS_PER_ROW} "
        f"{model.image_size}x{model.image_size}x{model.num_channels} float32 images "
        f"({row} bytes) and {where} is {memory} bytes",
    )


def t0_folder(t0: float) -> str:
    """``t0_0.30``: two decimals when they give ``t0`` back exactly, else its exact repr.

    The name always parses back to ``t0``, so distinct t0s never share a
    folder (0.501 -> ``t0_0.501``, 0.504 -> ``t0_0.504``).
    """
    short = f"{float(t0):.2f}"
    return "t0_" + (short if float(short) == float(t0) else repr(float(t0)))


def _load_model(model_dir: str) -> pretrained.LoadedModel:
    try:
        return pretrained.load_model(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"config.model_dir: cannot load {model_dir!r}: {' '.join(str(e).split())}"
        ) from None


def _build_catalog(inputs: guide_inputs.GuideInputConfig) -> guide_inputs.Catalog:
    try:
        return guide_inputs.build_catalog(inputs)
    except ValueError as e:
        raise _prefixed(e, "input") from None


def _read_png(path: str) -> np.ndarray:
    """An output PNG in ``[-1, 1]``; any error names the file (an OSError: exit status 1)."""
    try:
        with Image.open(io.BytesIO(files.read_bytes(path))) as image:
            return images.from_uint8(np.asarray(image.convert("RGB")))
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for damaged files
        raise OSError(f"contact sheet: cannot read {path}: {' '.join(str(e).split())}") from None


CONTACT_SHEET = "contact_sheet.png"
SUMMARY = "summary.json"
CONTACT_ROWS = 16


def write_contact_sheet(
    workdir: str,
    subdirs: dict[str, str],
    inputs: guide_inputs.GuideInputConfig,
    catalog: guide_inputs.Catalog,
) -> str | None:
    """guide | mask | output per sub-job for the first ids (canonical order) with a PNG output.

    ``subdirs`` maps column labels (``"t0=0.3"``) to sub-job folders.

    A function of the finished workdir and the inputs only, so a resumed job
    writes the same sheet as an uninterrupted one; published atomically.
    """
    outputs = {}
    for t0, sub in subdirs.items():
        for row in sinks.read_rows(files.join(sub, f"{sinks.MANIFEST}.jsonl"))[0]:
            if isinstance(row.get("output"), str):
                outputs[(row["id"], t0)] = files.join(sub, row["output"])
    chosen = [i for i in sorted(catalog.ids) if any((i, t0) in outputs for t0 in subdirs)]
    chosen = chosen[:CONTACT_ROWS]
    if not chosen:
        return None
    previews = guide_inputs.preview_examples(inputs, catalog, chosen)
    rows, names = [], []
    for example_id in chosen:
        if example_id not in previews:
            continue
        guide, mask = previews[example_id]
        cells = [guide, mask * 2.0 - 1.0]
        for t0 in subdirs:
            path = outputs.get((example_id, t0))
            cells.append(None if path is None else _read_png(path))
        rows.append(cells)
        names.append(os.path.splitext(example_id)[0])
    labels = ["guide", "mask", *subdirs]
    buffer = io.BytesIO()
    image_grid.contact_sheet(rows, labels, names).save(buffer, format="PNG")
    path = files.join(workdir, CONTACT_SHEET)
    sinks.atomic_write_bytes(path, buffer.getvalue())
    return path


PER_EXAMPLE_FOLDER = "t0_per_example"


@dataclasses.dataclass(frozen=True)
class SubJob:
    """One resumable part of a job: a folder, the t0 of its rows, which rows (the t0 rule)."""

    label: str  # column label of the contact sheet, e.g. "t0=0.3"
    folder: str  # under the workdir
    t0: float  # of rows without their own t0 (and of failed rows)
    t0_rows: str  # guide_inputs.T0_ROWS: "configured" or "own"


def sub_jobs(t0s: list[float], catalog: guide_inputs.Catalog) -> list[SubJob]:
    """The t0 rule (see ``guide_inputs.T0_ROWS``): configured t0s, plus one per-example sub-job.

    Inputs that name their own t0 are edited once, at that t0, in
    ``t0_per_example/``; all others at every configured t0. A configured
    sub-job without rows (every input names its t0) is left out.
    """
    given = catalog.columns["t0_given"]
    jobs = [SubJob(f"t0={t0:g}", t0_folder(t0), t0, "configured") for t0 in t0s if not given.all()]
    if given.any():
        jobs.append(SubJob("own t0", PER_EXAMPLE_FOLDER, t0s[0], "own"))
    return jobs


def _catalog_at(catalog: guide_inputs.Catalog, t0: float) -> guide_inputs.Catalog:
    """The catalog with ``t0`` for every row that does not name its own (no re-listing)."""
    columns = dict(catalog.columns)
    columns["t0"] = np.where(columns["t0_given"], columns["t0"], np.float32(t0))
    return dataclasses.replace(catalog, columns=columns)


def job_fingerprint(
    config: ml_collections.ConfigDict,
    model: pretrained.LoadedModel,
    sampler: Sampler,
    t0s: list[float],
    inputs: guide_inputs.GuideInputConfig,
) -> dict:
    """Everything that determines this job's outputs (see :mod:`sdedit_jax.jobs.fingerprint`)."""
    steps = config.sampler
    step_rule = (
        {"steps_per_unit_time": steps.steps_per_unit_time}
        if steps.steps_per_unit_time
        else {"n_steps": steps.n_steps}
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
    )


def _scalar_fields(value) -> dict:
    fields = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {}
    return {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool))}


@dataclasses.dataclass(frozen=True)
class PreparedJob:
    """A job whose configuration, model and inputs passed every check: what running needs."""

    config: ml_collections.ConfigDict
    workdir: str
    t0s: list[float]
    inputs: dict[float, guide_inputs.GuideInputConfig]
    catalog: guide_inputs.Catalog
    model: pretrained.LoadedModel
    sampler: Sampler
    step_rule: StepRule


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
    check_config(config)
    if files.is_local(workdir):
        _require(not os.path.isfile(workdir), "workdir", workdir, "a folder (this is a file)")
    t0s = [float(t0) for t0 in config.t0s]
    sampler, step_rule = sampler_from_config(config.sampler)
    model = _load_model(config.model_dir)
    check_model(model, input_config(config, t0s[0], model_size=model.image_size), t0s)
    check_batch(config.per_device_batch, model)
    inputs = {t0: input_config(config, t0, model.sde, model.image_size) for t0 in t0s}
    catalog = _build_catalog(inputs[t0s[0]])
    try:  # before anything is compiled or written: guides none of which the model takes
        preflight.check_guide_sizes(inputs[t0s[0]], catalog, config.model_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not dry_run:
        # After the checks above, so a configuration error leaves no workdir behind;
        # a gs:// path without credentials still fails here, before any work.
        files.check_writable(workdir)
    process, n_processes = jax.process_index(), jax.process_count()
    job_print = job_fingerprint(config, model, sampler, t0s, inputs[t0s[0]])
    try:
        fingerprint.check_or_record(workdir, job_print, overwrite=config.overwrite, record=False)
    except fingerprint.FingerprintMismatch as e:
        raise ConfigError(str(e)) from None
    prepared = PreparedJob(config, workdir, t0s, inputs, catalog, model, sampler, step_rule)
    if dry_run:
        return plan_job(prepared, retry_failed)
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
            fingerprint.check_or_record(workdir, job_print, overwrite=config.overwrite)
        multihost_utils.sync_global_devices("workdir fingerprint")
        return _run_locked(prepared, retry_failed, process, n_processes)


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x1b``)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def plan_job(prepared: PreparedJob, retry_failed: bool) -> dict:
    """The dry run: per sub-job, every input with ``edit`` or ``skip`` and the reason.

    Also counts the network calls each edit costs (steps x calls per step x
    repeats) and their total, so an expensive setting shows before it runs.
    """
    plan = []
    catalog = prepared.catalog
    errors = catalog.columns["error"]
    calls_per_step = prepared.sampler.nfe_per_step * prepared.config.repeats
    for job in sub_jobs(prepared.t0s, catalog):
        sub = files.join(prepared.workdir, job.folder)
        done = sinks.completed_index(sub, retry_failed=True)
        failed = sinks.failed_index(sub) if not retry_failed else sinks.CompletedIds([])
        mine = _mine(catalog, job)
        at_t0 = _catalog_at(catalog, job.t0)
        changed = {
            example_id: reason
            for example_id, _, _, reason in _changed_inputs(
                sub, at_t0, job, row_inputs.DigestTable(at_t0.columns), done, 0, 1
            )
        }
        is_done = done.contains(catalog.columns["id"])
        is_failed = failed.contains(catalog.columns["id"]) & ~is_done
        counts = {"edit": 0, "skip": 0, "network_calls": 0}
        print(f"[{job.folder}] plan ({job.label}):")
        for i in np.flatnonzero(mine):
            example_id = catalog.columns["id"][i]
            if example_id in changed:
                action, why = "fail", changed[example_id]
            elif is_done[i]:
                action, why = "skip", "done (its output is in the workdir)"
            elif is_failed[i]:
                action, why = "skip", "failed in an earlier run (--retry_failed tries it again)"
            elif errors[i]:
                action, why = "fail", str(errors[i])
            else:
                t0 = float(catalog.columns["t0"][i]) if job.t0_rows == "own" else job.t0
                calls = int(prepared.step_rule.steps_for(t0)) * calls_per_step
                counts["network_calls"] += calls
                action, why = "edit", f"t0={t0:g}, {calls} network calls"
            counts[action] = counts.get(action, 0) + 1
            print(f"  {action}  {_printable(str(example_id))}  ({_printable(why)})")
        print(f"[{job.folder}] {counts['edit']} edits, {counts['network_calls']} network calls")
        plan.append({"folder": job.folder, **counts})
    total = sum(part["network_calls"] for part in plan)
    print(f"in all: {sum(part['edit'] for part in plan)} edits, {total} network calls")
    return {
        "workdir": prepared.workdir,
        "dry_run": True,
        "plan": plan,
        "network_calls": total,
        "failures": 0,
    }


def _mine(catalog: guide_inputs.Catalog, job: SubJob) -> np.ndarray:
    """The catalog rows of a sub-job (the t0 rule)."""
    given = catalog.columns["t0_given"]
    return given if job.t0_rows == "own" else ~given


def _changed_inputs(
    sub: str,
    catalog: guide_inputs.Catalog,
    job: SubJob,
    digests: row_inputs.DigestTable,
    completed: sinks.CompletedIds,
    process: int,
    n_processes: int,
) -> list[tuple[str, str, str, str]]:
    """``(id, source, field, reason)`` of this host's finished ids whose inputs changed."""
    columns = catalog.columns
    rows = row_inputs.changed(columns, digests, completed) & _mine(catalog, job)
    rows &= np.arange(len(catalog)) % n_processes == process
    indices = np.flatnonzero(rows)
    if not len(indices):
        return []
    recorded = sinks.manifest_rows_of(sub, columns["id"][indices].tolist())
    out = []
    for i in indices:
        row = recorded.get(str(columns["id"][i]), {})
        field = row_inputs.changed_field(row, columns, i)
        out.append(
            (
                str(columns["id"][i]),
                str(columns["source"][i]),
                field,
                row_inputs.reason(field, row, columns, i),
            )
        )
    return out


def _run_locked(prepared: PreparedJob, retry_failed: bool, process: int, n_processes: int) -> dict:
    config, workdir, t0s = prepared.config, prepared.workdir, prepared.t0s
    inputs, catalog, model = prepared.inputs, prepared.catalog, prepared.model
    sampler, step_rule = prepared.sampler, prepared.step_rule
    editor = engine.Editor(
        model.sde, sampler, config.repeats, per_device_batch=config.per_device_batch
    )
    placed = editor.place_score(model.score_fn)
    subdirs, this_run, totals = {}, [], []
    # Each manifest row also gets its own reverse "steps" and network calls "nfe"
    # (nfe_per_step * steps * repeats), from the engine.
    job_fields = {
        "sde": type(model.sde).__name__,
        **sampler.manifest_fields(),
        "steps_per_unit_time": config.sampler.steps_per_unit_time,
        "n_steps": config.sampler.n_steps,
        "repeats": config.repeats,
        "model_sha256": model.checksum,
    }
    for job in sub_jobs(t0s, catalog):
        sub = files.join(workdir, job.folder)
        at_t0 = _catalog_at(catalog, job.t0)
        digests = row_inputs.DigestTable(at_t0.columns)
        completed = sinks.completed_index(sub, retry_failed=retry_failed)
        changed = _changed_inputs(sub, at_t0, job, digests, completed, process, n_processes)
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
            every_s=config.get("progress_every_s", PROGRESS_EVERY_S),
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
            )
        multihost_utils.sync_global_devices(f"wrote {sub}")
        subdirs[job.label] = sub
        if process == 0:
            final = sinks.finalize(sub)
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
        sheet = write_contact_sheet(workdir, subdirs, inputs[t0s[0]], catalog)
        result["contact_sheet"] = None if sheet is None else CONTACT_SHEET
    sinks.atomic_write_bytes(files.join(workdir, SUMMARY), json.dumps(result, indent=1).encode())
    return {"workdir": workdir, **result, "this_run": run}
