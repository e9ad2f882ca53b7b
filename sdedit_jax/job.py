"""A batch edit job: guides in, edited images + manifests + contact sheet out.

:func:`run_job` is what ``python -m sdedit_jax.main`` runs; see that module for
the command line and the output layout.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from sdedit_jax import engine, pretrained, report, workdir_lock
from sdedit_jax.data import guide_inputs, sinks
from sdedit_jax.sampling.integrate import Sampler


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` the way ``--config`` does."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_sdedit_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"{path}: not a config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def sampler_from_config(
    config: ml_collections.ConfigDict,
) -> tuple[Sampler, Callable[[np.ndarray], np.ndarray]]:
    """The static sampler and the per-example step rule ``steps_for(t0)``."""
    per_unit, fixed = config.steps_per_unit_time, config.n_steps
    if (per_unit > 0) == (fixed > 0):
        raise ValueError(
            "sampler: set exactly one of steps_per_unit_time (the paper's N) and n_steps, "
            f"got steps_per_unit_time={per_unit}, n_steps={fixed}"
        )
    most = per_unit if per_unit > 0 else fixed
    max_steps = config.max_steps or engine.step_bucket(most)
    sampler = Sampler(
        predictor=config.predictor,
        corrector=config.corrector,
        max_steps=max_steps,
        snr=config.snr,
        corrector_steps=config.corrector_steps,
        denoise=config.denoise,
    )

    def steps_for(t0: np.ndarray) -> np.ndarray:
        if per_unit > 0:
            return np.minimum(engine.paper_steps(per_unit, t0), max_steps)
        return np.full(np.shape(t0), fixed, np.int32)

    if fixed > max_steps:
        raise ValueError(f"sampler: n_steps={fixed} exceeds max_steps={max_steps}")
    return sampler, steps_for


class ConfigError(ValueError):
    """A configuration or startup problem; the message is one line naming field, value, rule."""


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            and bool(np.isfinite(value)))


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: got {value!r}; expected {allowed}")


def _prefixed(error: Exception, prefix: str) -> ConfigError:
    """A field-naming ValueError (``"name: ..."``) re-raised under ``config.<prefix>``."""
    text = " ".join(str(error).split())
    head, sep, _ = text.partition(": ")
    dotted = sep and head.replace("_", "").replace(".", "").isalnum()
    return ConfigError(f"config.{prefix}.{text}" if dotted else f"config.{prefix}: {text}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates every field the job reads, before any work (raises :class:`ConfigError`)."""
    t0s = config.t0s
    allowed_t0s = "a non-empty tuple of distinct start times in (0, 1], e.g. (0.3, 0.5)"
    _require(isinstance(t0s, (tuple, list)) and len(t0s) > 0, "t0s", t0s, allowed_t0s)
    for t0 in t0s:
        _require(_is_real(t0) and 0 < t0 <= 1, "t0s", t0s, allowed_t0s + f" ({t0!r} is not)")
    as_float32 = {float(np.float32(t0)) for t0 in t0s}
    _require(len(as_float32) == len(t0s), "t0s", t0s, allowed_t0s + " (distinct as float32)")
    sampler = config.sampler
    for name in ("steps_per_unit_time", "n_steps", "max_steps"):
        _require(_is_int(sampler[name]) and sampler[name] >= 0, f"sampler.{name}",
                 sampler[name], "an int >= 0 (0 = unset)")
    _require(_is_int(config.repeats) and config.repeats >= 1, "repeats", config.repeats,
             "an int >= 1 (SDEdit's K)")
    _require(_is_int(config.seed) and 0 <= config.seed < 2**31, "seed", config.seed,
             "an int in [0, 2^31)")
    _require(_is_int(config.per_device_batch) and config.per_device_batch >= 1,
             "per_device_batch", config.per_device_batch, "an int >= 1")
    _require(isinstance(config.contact_sheet, bool), "contact_sheet", config.contact_sheet,
             "True or False")
    _require(isinstance(config.model_dir, str) and bool(config.model_dir), "model_dir",
             config.model_dir, "a model folder, or 'default' for the shipped model")
    try:
        sampler_from_config(sampler)
    except ValueError as e:
        raise _prefixed(e, "sampler") from None
    for t0 in t0s:
        input_config(config, t0)


def input_config(config: ml_collections.ConfigDict, t0: float) -> guide_inputs.GuideInputConfig:
    """The guide input config of the sub-job at ``t0`` (raises :class:`ConfigError`)."""
    try:
        return guide_inputs.GuideInputConfig.from_mapping(
            dict(config.input.to_dict(), t0=float(t0), seed=config.seed))
    except (ValueError, TypeError) as e:
        raise _prefixed(e, "input") from None


def check_model(model: pretrained.LoadedModel, inputs: guide_inputs.GuideInputConfig,
                t0s: Iterable[float]) -> None:
    """The inputs must have the model's size and channels, t0s must lie above the SDE's eps."""
    size = (model.image_size, model.image_size)
    _require(tuple(inputs.image_size) == size, "input.image_size", inputs.image_size,
             f"{size}, the size of the model in {model.path}")
    _require(inputs.channels == model.num_channels, "input.channels", inputs.channels,
             f"{model.num_channels}, the channels of the model in {model.path}")
    for t0 in t0s:
        _require(t0 > model.sde.eps, "t0s", tuple(t0s),
                 f"values above the model SDE's eps={model.sde.eps}")


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
        raise ConfigError(f"config.model_dir: cannot load {model_dir!r}: "
                          f"{' '.join(str(e).split())}") from None


def _build_catalog(inputs: guide_inputs.GuideInputConfig) -> guide_inputs.Catalog:
    try:
        return guide_inputs.build_catalog(inputs)
    except ValueError as e:
        raise _prefixed(e, "input") from None


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0


CONTACT_SHEET = "contact_sheet.png"
SUMMARY = "summary.json"
CONTACT_ROWS = 16


def write_contact_sheet(workdir: str, subdirs: dict[float, str],
                        inputs: guide_inputs.GuideInputConfig,
                        catalog: guide_inputs.Catalog) -> str | None:
    """guide | mask | output per t0 for the first ids (canonical order) that have an output.

    A function of the finished workdir and the inputs only, so a resumed job
    writes the same sheet as an uninterrupted one; published atomically.
    """
    outputs = {}
    for t0, sub in subdirs.items():
        for row in sinks.read_rows(os.path.join(sub, f"{sinks.MANIFEST}.jsonl"))[0]:
            outputs[(row["id"], t0)] = os.path.join(sub, row["output"])
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
    labels = ["guide", "mask"] + [f"t0={t0:g}" for t0 in subdirs]
    buffer = io.BytesIO()
    report.contact_sheet(rows, labels, names).save(buffer, format="PNG")
    path = os.path.join(workdir, CONTACT_SHEET)
    sinks.atomic_write_bytes(path, buffer.getvalue())
    return path


def run_job(config: ml_collections.ConfigDict, workdir: str, *,
            retry_failed: bool = False) -> dict:
    """Runs every t0 sub-job of ``config``; returns the job summary (also in summary.json).

    The whole configuration, the model against the inputs and the input
    source are checked before any work (:class:`ConfigError`); the workdir is
    locked against a second launch (:class:`workdir_lock.WorkdirBusy`).
    ``summary.json`` describes the whole workdir (every invocation); the
    returned dict adds what this invocation did under ``this_run``.

    Args:
        retry_failed: try the inputs listed in ``failures.jsonl`` again.
    """
    check_config(config)
    t0s = [float(t0) for t0 in config.t0s]
    inputs = {t0: input_config(config, t0) for t0 in t0s}
    sampler, steps_for = sampler_from_config(config.sampler)
    model = _load_model(config.model_dir)
    check_model(model, inputs[t0s[0]], t0s)
    catalog = _build_catalog(inputs[t0s[0]])
    _require(not os.path.isfile(workdir), "workdir", workdir, "a folder (this is a file)")
    process, n_processes = jax.process_index(), jax.process_count()
    with workdir_lock.acquire(workdir, process):
        sinks.remove_orphan_temps(workdir, process, recursive=False)
        return _run_locked(config, workdir, t0s, inputs, catalog, model, sampler, steps_for,
                           retry_failed, process, n_processes)


def _run_locked(config, workdir, t0s, inputs, catalog, model, sampler, steps_for,
                retry_failed, process, n_processes) -> dict:
    editor = engine.Editor(model.sde, sampler, config.repeats,
                           per_device_batch=config.per_device_batch)
    placed = editor.place_score(model.score_fn)
    subdirs, this_run, totals = {}, [], []
    for t0 in t0s:
        sub = os.path.join(workdir, t0_folder(t0))
        completed = sinks.completed_ids(sub, retry_failed=retry_failed)
        # Every host must see the same finished set before anyone writes more.
        multihost_utils.sync_global_devices(f"read completed {sub}")
        stream = guide_inputs.make_guide_dataset(
            inputs[t0], batch_size_per_host=editor.global_batch // n_processes,
            completed=completed, catalog=catalog if t0 == t0s[0] else None,
        )
        job_fields = {"sde": type(model.sde).__name__, "predictor": sampler.predictor,
                      "corrector": sampler.corrector, "max_steps": sampler.max_steps,
                      "steps_per_unit_time": config.sampler.steps_per_unit_time,
                      "n_steps": config.sampler.n_steps, "repeats": config.repeats,
                      "model_sha256": model.checksum}
        print(f"[t0={t0:g}] {stream.num_examples} to edit, {stream.num_skipped} already done, "
              f"{stream.num_steps} steps of {editor.global_batch}", file=sys.stderr, flush=True)
        with sinks.Sink(sub, process_index=process, job_fields=job_fields,
                        npz="per_example" if config.save_npz else "none") as sink:
            summary = engine.run_stream(
                editor, placed, stream.dataset.as_numpy_iterator(), sink,
                num_steps=stream.num_steps, steps_for=steps_for,
                log_path=os.path.join(sub, f"throughput.p{process:05d}.jsonl"),
                progress_label=f"t0={t0:g}",
            )
        multihost_utils.sync_global_devices(f"wrote {sub}")
        subdirs[t0] = sub
        if process == 0:
            final = sinks.finalize(sub)
            totals.append({"t0": t0, "folder": t0_folder(t0), "edited": final.manifest_rows,
                           "failed": final.failure_rows,
                           "remaining": stream.total_examples - final.manifest_rows
                           - final.failure_rows})
        this_run.append({"t0": t0, "steps": summary.steps, "edited": summary.rows_done,
                         "seconds": round(summary.seconds, 2),
                         "first_step_seconds": round(summary.first_step_seconds, 2),
                         "images_per_s": round(summary.images_per_second, 3),
                         "skipped_done": stream.num_skipped})
    run = {"devices": jax.device_count(), "processes": n_processes, "sub_jobs": this_run}
    if process != 0:
        return {"workdir": workdir, "failures": None, "this_run": run}
    result = {"model_sha256": model.checksum, "inputs": len(catalog), "sub_jobs": totals,
              "edited": sum(s["edited"] for s in totals),
              "failures": sum(s["failed"] for s in totals),
              "complete": all(s["remaining"] == 0 for s in totals), "contact_sheet": None}
    if config.contact_sheet:
        sheet = write_contact_sheet(workdir, subdirs, inputs[t0s[0]], catalog)
        result["contact_sheet"] = None if sheet is None else CONTACT_SHEET
    sinks.atomic_write_bytes(os.path.join(workdir, SUMMARY),
                             json.dumps(result, indent=1).encode())
    return {"workdir": workdir, **result, "this_run": run}
