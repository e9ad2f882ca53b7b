"""A batch edit job: guides in, edited images + manifests + contact sheet out.

:func:`run_job` is what ``python -m sdedit_jax.main`` runs; see that module for
the command line and the output layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from sdedit_jax import engine, pretrained, report
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
        eta=config.get("eta", 0.0),
        time_grid=config.get("time_grid", ""),
    )

    def steps_for(t0: np.ndarray) -> np.ndarray:
        if per_unit > 0:
            return np.minimum(engine.paper_steps(per_unit, t0), max_steps)
        return np.full(np.shape(t0), fixed, np.int32)

    if fixed > max_steps:
        raise ValueError(f"sampler: n_steps={fixed} exceeds max_steps={max_steps}")
    return sampler, steps_for


def _remember_guides(batches: Iterable[dict], store: dict, limit: int) -> Iterator[dict]:
    """Passes batches through, keeping the first ``limit`` good guides for the contact sheet."""
    for batch in batches:
        for row, example_id in enumerate(batch["id"]):
            if len(store) < limit and batch["valid"][row] and batch["ok"][row]:
                store[example_id.decode()] = (batch["guide"][row], batch["mask"][row])
        yield batch


def _read_png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1.0


def write_contact_sheet(workdir: str, subdirs: dict[float, str], guides: dict) -> str:
    """guide | mask | output per t0, one row per remembered guide."""
    outputs = {}
    for t0, sub in subdirs.items():
        with open(os.path.join(sub, "manifest.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                outputs[(row["id"], t0)] = os.path.join(sub, row["output"])
    rows, names = [], []
    for example_id, (guide, mask) in sorted(guides.items()):
        cells = [guide, mask * 2.0 - 1.0]
        for t0 in subdirs:
            path = outputs.get((example_id, t0))
            cells.append(None if path is None else _read_png(path))
        rows.append(cells)
        names.append(os.path.splitext(example_id)[0])
    labels = ["guide", "mask"] + [f"t0={t0:g}" for t0 in subdirs]
    path = os.path.join(workdir, "contact_sheet.png")
    report.contact_sheet(rows, labels, names).save(path)
    return path


def run_job(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every t0 sub-job of ``config``; returns the job summary (also in summary.json)."""
    model = pretrained.load_model(config.model_dir)
    sampler, steps_for = sampler_from_config(config.sampler)
    editor = engine.Editor(model.sde, sampler, config.repeats,
                           per_device_batch=config.per_device_batch)
    placed = editor.place_score(model.score_fn)
    process, n_processes = jax.process_index(), jax.process_count()
    guides_seen: dict = {}
    subdirs, per_t0 = {}, []
    for t0 in config.t0s:
        sub = os.path.join(workdir, f"t0_{t0:.2f}")
        input_config = dict(config.input.to_dict(), t0=float(t0), seed=config.seed)
        completed = sinks.completed_ids(sub)
        # Every host must see the same finished set before anyone writes more.
        multihost_utils.sync_global_devices(f"read completed {sub}")
        stream = guide_inputs.make_guide_dataset(
            input_config, batch_size_per_host=editor.global_batch // n_processes,
            completed=completed,
        )
        job_fields = {"sde": type(model.sde).__name__, "predictor": sampler.predictor,
                      "corrector": sampler.corrector, "max_steps": sampler.max_steps,
                      "eta": sampler.eta, "time_grid": sampler.grid_name,
                      # Network calls per example (a row with its own t0 under the paper's
                      # rule: nfe_per_step * ceil(steps_per_unit_time * t0) * repeats).
                      "nfe_per_step": sampler.nfe_per_step,
                      "nfe": int(steps_for(np.float64(t0))) * sampler.nfe_per_step
                      * config.repeats,
                      "steps_per_unit_time": config.sampler.steps_per_unit_time,
                      "n_steps": config.sampler.n_steps, "repeats": config.repeats,
                      "model_sha256": model.checksum}
        print(f"[t0={t0:g}] {stream.num_examples} to edit, {stream.num_skipped} already done, "
              f"{stream.num_steps} steps of {editor.global_batch}", file=sys.stderr, flush=True)
        with sinks.Sink(sub, process_index=process, job_fields=job_fields,
                        save_npz=config.save_npz) as sink:
            batches = _remember_guides(stream.dataset.as_numpy_iterator(), guides_seen, 16)
            summary = engine.run_stream(
                editor, placed, batches, sink, num_steps=stream.num_steps,
                steps_for=steps_for,
                log_path=os.path.join(sub, f"throughput.p{process:05d}.jsonl"),
                progress_label=f"t0={t0:g}",
            )
        multihost_utils.sync_global_devices(f"wrote {sub}")
        final = sinks.finalize(sub) if process == 0 else None
        subdirs[float(t0)] = sub
        per_t0.append({"t0": float(t0), "steps": summary.steps, "edited": summary.rows_done,
                       "seconds": round(summary.seconds, 2),
                       "first_step_seconds": round(summary.first_step_seconds, 2),
                       "images_per_s": round(summary.images_per_second, 3),
                       "skipped_done": stream.num_skipped,
                       "manifest_rows": None if final is None else final.manifest_rows,
                       "failures": None if final is None else final.failure_rows})
    result = {"workdir": workdir, "model_sha256": model.checksum, "devices": jax.device_count(),
              "processes": n_processes, "sub_jobs": per_t0,
              "failures": sum(s["failures"] or 0 for s in per_t0)}
    if process == 0:
        if config.contact_sheet and guides_seen:
            result["contact_sheet"] = write_contact_sheet(workdir, subdirs, guides_seen)
        sinks.atomic_write_bytes(os.path.join(workdir, "summary.json"),
                                 json.dumps(result, indent=1).encode())
    return result


