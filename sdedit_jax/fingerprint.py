"""A workdir's fingerprint: everything that determines its outputs, recorded once.

Why: resuming skips every id that already has an output. If the model, the
sampler, K or anything else that shapes an output changed between two runs,
a resume would silently keep old outputs next to new ones and the workdir
would claim results its configuration did not produce. So the first run
records the fingerprint in ``<workdir>/job_fingerprint.json``, and every later
run must present the same one, or is refused with one line naming the fields
that differ; ``--config.overwrite=True`` deletes the old outputs instead.

Fields (see :func:`job_fingerprint`): model weights (sha256), the SDE, the
sampler and its settings, the step rule, K (``repeats``), the seed rule, the
t0 list and the t0 rule, the image size and channels, how guides are made
from the inputs (``resize``, generator) and the output format. Settings that
never change an output (batch size, writer threads, PNG compression level,
input paths) are not part of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sdedit_jax import files

FILE = "job_fingerprint.json"
# Outputs of a job in its workdir (what overwrite deletes): t0 folders and job-level files.
_JOB_FILES = ("summary.json", "contact_sheet.png", "tensorboard", FILE)


class FingerprintMismatch(ValueError):
    """The workdir holds outputs of a different configuration (one-line message)."""


def job_fingerprint(
    *,
    model_sha256: str,
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
) -> dict[str, Any]:
    """The fingerprint as a JSON-ready dict (field names are what mismatch messages show)."""
    return {
        "model_sha256": model_sha256,
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


def check_or_record(
    workdir: str, fingerprint: Mapping[str, Any], *, overwrite: bool = False, record: bool = True
) -> None:
    """Refuses a workdir made by another configuration; records the fingerprint of a new one.

    Call on every process before any output is written; only one process
    (``record=True``) writes the file, after the others have checked it.

    Args:
        workdir: the job's folder (any path :mod:`sdedit_jax.files` understands).
        fingerprint: :func:`job_fingerprint` of this run.
        overwrite: delete the outputs of a different configuration instead of refusing.
        record: write the fingerprint (process 0) when the workdir has none.

    Raises:
        FingerprintMismatch: naming the differing fields and how to proceed.
    """
    path = files.join(workdir, FILE)
    current = json.loads(json.dumps(fingerprint))
    recorded = json.loads(files.read_text(path)) if files.exists(path) else None
    if recorded == current:
        return
    outputs = _job_outputs(workdir)
    if recorded is None and not any(files.basename(p).startswith("t0_") for p in outputs):
        if record:
            files.publish_bytes(path, json.dumps(current, indent=1, sort_keys=True).encode())
        return
    if not overwrite:
        what = (
            "its outputs have no fingerprint (made by an older version)"
            if recorded is None
            else "its configuration differs: " + "; ".join(differences(recorded, current))
        )
        raise FingerprintMismatch(
            f"workdir {workdir} holds outputs of another configuration ({what}); resume it with "
            "its own configuration, use a new --workdir, or pass --config.overwrite=True to "
            "delete its outputs and start over"
        )
    if record:
        for output in outputs:
            if files.isdir(output):
                files.rmtree(output)
            else:
                files.remove(output)
        files.publish_bytes(path, json.dumps(current, indent=1, sort_keys=True).encode())
