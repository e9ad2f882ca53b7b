"""Save to dataset: a preview's guide, mask and manifest row, in the layout the job reads.

The folder holds ``guides/<id>.png``, ``masks/<id>.png`` and one manifest per
(preset, K), ``manifest-<preset>-k<K>.jsonl`` (rows ``id``, ``path``, ``mask``,
``t0``, ``seed``; for a text model also ``prompt``, ``negative_prompt`` and
``guidance_scale``), since a job runs one sampler and one K. A text model's rows
without guidance (scale <= 1) go to ``manifest-<preset>-k<K>-unguided.jsonl``: a job
carries the negative half for every row when one row guides, which changes the
program. :func:`job_command` is the one command that edits a manifest, to the
previewed bytes.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from sdedit_jax.studio import presets
from sdedit_jax.studio.previews import Row

GUIDES, MASKS = "guides", "masks"


def manifest_name(preset: str, repeats: int, unguided: bool = False) -> str:
    suffix = "-unguided" if unguided else ""
    return f"manifest-{presets.check_preset(preset)}-k{repeats}{suffix}.jsonl"


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def manifest_row(row: Row, has_mask: bool) -> dict:
    """The row: t0 (and guidance) the float32 values the preview used, written so they
    read back as them; a text model's row names its own text, so no job default applies."""
    s = row.settings
    out = {"id": row.id, "path": f"{GUIDES}/{row.id}.png", "t0": s.t0}
    if has_mask:
        out["mask"] = f"{MASKS}/{row.id}.png"
    out["seed"] = row.seed
    if s.guidance_scale is not None:
        out.update(
            prompt=s.prompt, negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale
        )
    return out


def save(folder: str, row: Row, guide_png: bytes, mask_png: bytes | None) -> str:
    """Writes the row's guide, mask and manifest row (replacing a row of the same id).

    Returns:
        The manifest's path.
    """
    _atomic_write(os.path.join(folder, GUIDES, f"{row.id}.png"), guide_png)
    if mask_png:
        _atomic_write(os.path.join(folder, MASKS, f"{row.id}.png"), mask_png)
    s = row.settings
    path = os.path.join(folder, manifest_name(s.preset, s.repeats, s.unguided))
    lines = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if json.loads(line)["id"] != row.id]
    lines.append(json.dumps(manifest_row(row, bool(mask_png))))
    _atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def job_command(
    manifest: str, model_dir: str, preset: str, repeats: int, per_device_batch: int
) -> list[str]:
    """The job's command line that edits ``manifest`` as the studio previewed it.

    ``per_device_batch`` must be the studio's: an edit is bit-identical at a fixed value.
    """
    folder = os.path.dirname(os.path.abspath(manifest))
    workdir = os.path.join(folder, "runs", os.path.basename(manifest).removesuffix(".jsonl"))
    return [
        sys.executable,
        "-m",
        "sdedit_jax.main",
        "--config",
        "configs/default.py",
        f"--config.model_dir={model_dir}",
        "--config.input.source=manifest",
        f"--config.input.path={os.path.abspath(manifest)}",
        *presets.command_flags(preset),
        f"--config.repeats={repeats}",
        f"--config.per_device_batch={per_device_batch}",
        f"--workdir={workdir}",
    ]


def shell_line(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
