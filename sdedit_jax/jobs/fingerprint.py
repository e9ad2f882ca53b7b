"""A workdir's fingerprint: everything that determines its outputs, recorded once.

Why: resuming skips every id that already has an output. If the model, the
sampler, K or anything else that shapes an output changed between two runs,
a resume would silently keep old outputs next to new ones and the workdir
would claim results its configuration did not produce. So the first run
records the fingerprint in ``<workdir>/job_fingerprint.json``, and every later
run must present the same one, or is refused with one line naming the fields
that differ; ``--config.overwrite=True`` deletes the old outputs instead.

Fields (see :func:`job_fingerprint`): model weights (sha256), the whole model
description (architecture and network config, its SDE, parameterisation,
conditioning input and data range, defaults filled in, so that two spellings
of one network agree and an edited ``model_info.json`` does not), the SDE, the
sampler and its settings, the step rule, K (``repeats``), the seed rule, the
t0 list and the t0 rule, the image size and channels, how guides are made
from the inputs (``resize``, generator), the output format and, for models that
take prompts, the job's text defaults (``config.prompt``, ``negative_prompt``,
``guidance_scale``) and the latent codec's settings (``config.latent``). Settings that
never change an output (batch size, writer threads, PNG compression level,
input paths) are not part of it.

Versions: the file records its ``version`` (:data:`VERSION`). A workdir of an
earlier version is checked on the fields that version recorded (version 1,
before ``version`` existed, had no ``model``) and, when they agree, its file is
rewritten at the current version, so workdirs of earlier releases resume.

A workdir that holds no outputs (no manifest row: only failures, or nothing)
records nothing worth keeping: a run of another configuration (e.g. one that
fixes why every input failed) deletes those leftovers and starts it afresh.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sdedit_jax.util import files

FILE = "job_fingerprint.json"
VERSION = 2
# Fields each version added (a fingerprint of version v has none added after v).
_ADDED = {2: ("version", "model")}
# Outputs of a job in its workdir (what overwrite deletes): t0 folders and job-level files.
_JOB_FILES = ("summary.json", "contact_sheet.png", "tensorboard", FILE)


class FingerprintMismatch(ValueError):
    """The workdir holds outputs of a different configuration (one-line message)."""


def job_fingerprint(
    *,
    model_sha256: str,
    model: Mapping[str, Any] | None,
    sde: Mapping[str, Any],
    sampler: Mapping[str, Any],
    step_rule: Mapping[str, Any],
    repeats: int,
    seed: int,
    t0s: list[float],
    t0_rule: str,
    image_size: tuple[int, int],
    channels: int,
    guides: Mapping[str, Any],
    output: Mapping[str, Any],
    text: Mapping[str, Any] | None = None,
    codec: Mapping[str, Any] | None = None,
    micro_conditioning: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint as a JSON-ready dict (field names are what mismatch messages show).

    ``text`` (the job's prompt defaults and the rule for rows' own) and ``codec``
    (the latent codec's settings) are fields only of models that take prompts, and
    ``micro_conditioning`` (``config.sdxl``) only of SDXL models, so the fingerprints
    of other jobs are those of earlier versions.
    """
    optional = (("text", text), ("codec", codec), ("micro_conditioning", micro_conditioning))
    extra = {name: dict(value) for name, value in optional if value is not None}
    return {
        **extra,
        "version": VERSION,
        "model_sha256": model_sha256,
        "model": None if model is None else dict(model),
        "sde": dict(sde),
        "sampler": dict(sampler),
        "step_rule": dict(step_rule),
        "repeats": int(repeats),
        "seed_rule": {
            "seed": int(seed),
            "per_example": "fold_in(seed, sha256(id)); an input's own seed replaces seed",
        },
        "t0s": [float(t) for t in t0s],
        "t0_rule": t0_rule,
        "image_size": [int(s) for s in image_size],
        "channels": int(channels),
        "guides": dict(guides),
        "output": dict(output),
    }


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 24 else text[:20] + '..."'


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field old -> new"`` for every (dotted) field that differs, sorted."""
    old, new = _flat(json.loads(json.dumps(recorded))), _flat(json.loads(json.dumps(current)))
    return [
        f"{k} {_short(old.get(k))} -> {_short(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def _job_outputs(workdir: str) -> list[str]:
    if not files.isdir(workdir):
        return []
    return [
        files.join(workdir, n)
        for n in files.listdir(workdir)
        if n.startswith("t0_") or n in _JOB_FILES
    ]


def _holds_outputs(outputs: list[str]) -> bool:
    """Whether a sub-job folder has a non-empty manifest (a row naming an output)."""
    for folder in outputs:
        if not (files.basename(folder).startswith("t0_") and files.isdir(folder)):
            continue
        for name in files.listdir(folder):
            if name.startswith("manifest") and name.endswith(".jsonl"):
                if files.size(files.join(folder, name)) > 0:
                    return True
    return False


def _as_of(fingerprint: Mapping[str, Any], version: int) -> dict[str, Any]:
    """``fingerprint`` without the fields added after ``version``."""
    later = {f for v, added in _ADDED.items() if v > version for f in added}
    return {k: v for k, v in fingerprint.items() if k not in later}


def _read(path: str) -> dict[str, Any] | None:
    if not files.exists(path):
        return None
    try:
        recorded = files.read_json_object(path)
    except ValueError as err:
        raise FingerprintMismatch(
            f"{err}; it records the configuration of the workdir's outputs: restore it, use a "
            "new --workdir, or pass --config.overwrite=True to delete the outputs and start over"
        ) from None
    version = recorded.get("version", 1)
    if not (isinstance(version, int) and 1 <= version <= VERSION):
        raise FingerprintMismatch(
            f"{path}: version {version!r} is not one this release reads (1..{VERSION}); use "
            "the release that wrote it, a new --workdir, or --config.overwrite=True"
        )
    return recorded


def _publish(path: str, fingerprint: Mapping[str, Any]) -> None:
    files.publish_bytes(path, json.dumps(fingerprint, indent=1, sort_keys=True).encode())


def _delete(outputs: list[str]) -> None:
    for output in outputs:
        if files.isdir(output):
            files.rmtree(output)
        else:
            files.remove(output)


def check_or_record(
    workdir: str, fingerprint: Mapping[str, Any], *, overwrite: bool = False, record: bool = True
) -> None:
    """Refuses a workdir made by another configuration; records the fingerprint of a new one.

    Call on every process before any output is written; only one process
    (``record=True``) writes the file, after the others have checked it.

    Args:
        workdir: the job's folder (any path :mod:`sdedit_jax.util.files` understands).
        fingerprint: :func:`job_fingerprint` of this run.
        overwrite: delete the outputs of a different configuration instead of refusing.
        record: write the fingerprint (process 0) when the workdir has none, or has
            one of an earlier version (rewritten), or holds no outputs.

    Raises:
        FingerprintMismatch: naming the differing fields and how to proceed (also for
            an unreadable fingerprint file).
    """
    path = files.join(workdir, FILE)
    current = json.loads(json.dumps(fingerprint))
    try:
        recorded = _read(path)
    except FingerprintMismatch:
        if not overwrite and _holds_outputs(_job_outputs(workdir)):
            raise
        recorded = {}  # unreadable, and nothing to keep or to be overwritten
    if recorded == current:
        return
    version = 1 if recorded is None else recorded.get("version", 1)
    if recorded and version < VERSION and recorded == _as_of(current, version):
        if record:  # an earlier release's workdir of this configuration: resume it
            _publish(path, current)
        return
    outputs = _job_outputs(workdir)
    if not _holds_outputs(outputs):  # nothing but failures or bookkeeping to keep
        if record:
            _delete([o for o in outputs if files.basename(o) != FILE])
            _publish(path, current)
        return
    if not overwrite:
        what = (
            "its outputs have no fingerprint (made by an older version)"
            if recorded is None
            else "its configuration differs: "
            + "; ".join(differences(recorded, _as_of(current, version)))
        )
        raise FingerprintMismatch(
            f"workdir {workdir} holds outputs of another configuration ({what}); resume it with "
            "its own configuration, use a new --workdir, or pass --config.overwrite=True to "
            "delete its outputs and start over"
        )
    if record:
        _delete(outputs)
        _publish(path, current)
