"""The shape of a job: its sub-jobs (the t0 rule and folders), what a resume finds
changed, and the dry run's plan of every input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdedit_jax import pretrained
from sdedit_jax.data import guide_inputs
from sdedit_jax.jobs import manifest
from sdedit_jax.jobs.checks import JobConfig
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.sampling.steps import StepRule
from sdedit_jax.util import files


def t0_folder(t0: float) -> str:
    """``t0_0.30``: two decimals when they give ``t0`` back exactly, else its exact repr.

    The name always parses back to ``t0``, so distinct t0s never share a
    folder (0.501 -> ``t0_0.501``, 0.504 -> ``t0_0.504``).
    """
    short = f"{float(t0):.2f}"
    return "t0_" + (short if float(short) == float(t0) else repr(float(t0)))


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


def catalog_at(catalog: guide_inputs.Catalog, t0: float) -> guide_inputs.Catalog:
    """The catalog with ``t0`` for every row that does not name its own (no re-listing)."""
    columns = dict(catalog.columns)
    columns["t0"] = np.where(columns["t0_given"], columns["t0"], np.float32(t0))
    return dataclasses.replace(catalog, columns=columns)


@dataclasses.dataclass(frozen=True)
class PreparedJob:
    """A job whose configuration, model and inputs passed every check: what running needs."""

    config: JobConfig
    workdir: str
    t0s: list[float]
    inputs: dict[float, guide_inputs.GuideInputConfig]
    catalog: guide_inputs.Catalog
    model: pretrained.LoadedModel
    sampler: Sampler
    step_rule: StepRule


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
        done = manifest.completed_index(sub, retry_failed=True)
        failed = manifest.failed_index(sub) if not retry_failed else manifest.CompletedIds([])
        mine = rows_of(catalog, job)
        at_t0 = catalog_at(catalog, job.t0)
        changed = {
            example_id: reason
            for example_id, _, _, reason in changed_inputs(
                sub, at_t0, job, manifest.DigestTable(at_t0.columns), done, 0, 1
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


def rows_of(catalog: guide_inputs.Catalog, job: SubJob) -> np.ndarray:
    """The catalog rows of a sub-job (the t0 rule)."""
    given = catalog.columns["t0_given"]
    return given if job.t0_rows == "own" else ~given


def changed_inputs(
    sub: str,
    catalog: guide_inputs.Catalog,
    job: SubJob,
    digests: manifest.DigestTable,
    completed: manifest.CompletedIds,
    process: int,
    n_processes: int,
) -> list[tuple[str, str, str, str]]:
    """``(id, source, field, reason)`` of this host's finished ids whose inputs changed."""
    columns = catalog.columns
    rows = changed(columns, digests, completed) & rows_of(catalog, job)
    rows &= np.arange(len(catalog)) % n_processes == process
    indices = np.flatnonzero(rows)
    if not len(indices):
        return []
    recorded = manifest.manifest_rows_of(sub, columns["id"][indices].tolist())
    out = []
    for i in indices:
        row = recorded.get(str(columns["id"][i]), {})
        field = changed_field(row, columns, i)
        out.append(
            (
                str(columns["id"][i]),
                str(columns["source"][i]),
                field,
                reason(field, row, columns, i),
            )
        )
    return out


def changed(
    columns: Mapping[str, np.ndarray], table: manifest.DigestTable, completed: manifest.CompletedIds
) -> np.ndarray:
    """Rows finished with a recorded digest other than their inputs' digest now."""
    recorded = completed.digests(columns["id"])
    return (recorded != 0) & (recorded != table.values)


def changed_field(recorded: Mapping[str, Any], columns: Mapping[str, np.ndarray], i: int) -> str:
    """Which input of catalog row ``i`` differs from the finished row ``recorded``.

    Rows record their source, t0, seed, text and micro-conditioning: if those agree,
    the mask (the only input a row does not record in clear) changed. Rows of earlier
    versions record no micro-conditioning: theirs was the job's.
    """
    if recorded.get("source") != columns["source"][i]:
        return "path"
    if recorded.get("seed") != int(columns["seed"][i]):
        return "seed"
    if not _same_float(recorded.get("t0"), columns["t0"][i]):
        return "t0"
    for field in TEXT_FIELDS:
        if field in columns and _text_value(columns, field, i) != _recorded_text(recorded, field):
            return field
    for field in MICRO_FIELDS:
        if field in columns:
            was = recorded.get(field)
            if was != guide_inputs.micro.row_value(columns, field, i) and (
                was is not None or columns[guide_inputs.micro.OWN][i]
            ):
                return field
    return "mask"


TEXT_FIELDS = guide_inputs.text.FIELDS
MICRO_FIELDS = guide_inputs.micro.FIELDS


def _same_float(recorded: Any, value: float) -> bool:
    return isinstance(recorded, (int, float)) and np.float32(recorded) == np.float32(value)


def _text_value(columns: Mapping[str, np.ndarray], field: str, i: int) -> Any:
    value = columns[field][i]
    return float(np.float32(value)) if field == "guidance_scale" else value


def _recorded_text(recorded: Mapping[str, Any], field: str) -> Any:
    value = recorded.get(field)
    if field == "guidance_scale" and isinstance(value, (int, float)):
        return float(np.float32(value))
    return value


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened to stay inside one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(str(value))} chars)"


def reason(
    field: str, recorded: Mapping[str, Any], columns: Mapping[str, np.ndarray], i: int
) -> str:
    """The failure reason of a finished id whose input ``field`` changed (one line)."""
    now = {"path": columns["source"][i], "seed": int(columns["seed"][i])}
    now["t0"] = float(np.float32(columns["t0"][i]))
    was = {"path": recorded.get("source"), "seed": recorded.get("seed"), "t0": recorded.get("t0")}
    if field in TEXT_FIELDS:
        now[field], was[field] = _text_value(columns, field, i), _recorded_text(recorded, field)
    if field in MICRO_FIELDS:
        now[field] = guide_inputs.micro.row_value(columns, field, i)
        was[field] = recorded.get(field, "the job's")
    detail = f" ({_shown(was[field])} then, {_shown(now[field])} now)" if field in now else ""
    return (
        f"inputs ({columns['source'][i]}): {field} changed since the output in "
        f"{recorded.get('output') or recorded.get('npz')} was made{detail}; the workdir keeps "
        "that output: give the example a new id, or use another workdir"
    )
