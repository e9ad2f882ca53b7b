"""SDXL's base-then-refiner recipe as one resumable command: two jobs, one workdir each.

Why two jobs: the refiner is SDEdit by design (the base edits at its t0, the refiner
edits the base's outputs at a low t0), and a workdir holds one model's outputs under
one fingerprint. A config with a ``refiner`` block (``configs/sdxl.py:base_refiner``)
runs the base job in ``<workdir>/base`` and then the refiner job in
``<workdir>/refiner``, whose guides are the base's float outputs
(``base/t0_*/arrays/<stem>.npz``, never the 8-bit PNGs), listed in
``<workdir>/refiner_guides.jsonl``: one row per edited base row, with that row's id,
seed, prompt, negative prompt, original size and crop, and the mask of its original
guide (the base pasted the guide outside the mask, so the refiner's output still
equals the original guide there). Base rows that failed are not refined. Re-running
the command resumes both jobs (each skips its finished ids).

The ``refiner`` block holds what differs for the second stage (:data:`REFINER_FIELDS`);
everything else (inputs, sampler, seed, sizes, outputs) is the base's. The base must
have one t0, write per-example float arrays and take its masks from files (no guide
generator), or the command is refused before any work.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from sdedit_jax.jobs import checks, manifest
from sdedit_jax.jobs.checks import ConfigError
from sdedit_jax.jobs.run import run_job
from sdedit_jax.util import files
from sdedit_jax.util.config import unknown_field

BLOCK = "refiner"
STAGES = ("base", "refiner")
GUIDES = "refiner_guides.jsonl"
# The refiner block's fields -> where they go in the refiner's job config.
REFINER_FIELDS = {
    "model_dir": "model_dir",
    "t0s": "t0s",
    "guidance_scale": "guidance_scale",
    "aesthetic_score": "sdxl.aesthetic_score",
    "negative_aesthetic_score": "sdxl.negative_aesthetic_score",
}
# Each base row's fields that the refiner's row carries over (beside id, guide and mask).
CARRIED = ("seed", "prompt", "negative_prompt", "original_size", "crops_coords_top_left")


def is_two_stage(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is a two-stage config (it has a ``refiner`` block)."""
    return BLOCK in config


def stage_configs(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The base and refiner job configs of a two-stage ``config`` (:class:`ConfigError`)."""
    values = config.to_dict()
    block = values.pop(BLOCK)
    if not isinstance(block, dict):
        raise checks.field_error(BLOCK, block, f"a block of {sorted(REFINER_FIELDS)}")
    for key in block:
        if key not in REFINER_FIELDS:
            raise ConfigError(unknown_field(f"config.{BLOCK}.{key}", block[key], REFINER_FIELDS))
    t0s = values["t0s"]
    if not (isinstance(t0s, (tuple, list)) and len(t0s) == 1):
        raise checks.field_error("t0s", t0s, "one t0 for the base stage of a two-stage job")
    if values["output"]["npz"] != "per_example":
        raise checks.field_error(
            "output.npz", values["output"]["npz"], "'per_example' (the refiner reads its floats)"
        )
    if values["input"]["generator"] not in ("none", ""):
        raise checks.field_error(
            "input.generator", values["input"]["generator"], "'none' (masks must be files)"
        )
    refiner = json.loads(json.dumps(values))  # a deep copy
    for key, value in block.items():
        *blocks, field = REFINER_FIELDS[key].split(".")
        target = refiner
        for name in blocks:
            target = target[name]
        target[field] = value
    refiner["input"].update(source="manifest", path=files.join(workdir, GUIDES))
    refiner["prompt"] = None  # every row carries its base row's
    return ml_collections.ConfigDict(values), ml_collections.ConfigDict(refiner)


def refiner_rows(base_config: ml_collections.ConfigDict, base_dir: str) -> list[dict[str, Any]]:
    """The refiner's manifest rows: one per edited base row, sorted by id."""
    job = checks.check_config(base_config)
    catalog = checks.build_catalog(job.input_config(job.t0s[0]))
    masks = dict(zip(catalog.ids, catalog.columns["mask_path"].tolist(), strict=True))
    rows = []
    for folder in sorted(files.listdir(base_dir)) if files.isdir(base_dir) else []:
        sub = files.join(base_dir, folder)
        if not (folder.startswith("t0_") and files.isdir(sub)):
            continue
        done, _ = manifest.read_rows(files.join(sub, f"{manifest.MANIFEST}.jsonl"))
        for row in done:
            out = {"id": row["id"], "path": files.abspath(files.join(sub, row["npz"]))}
            if masks.get(row["id"]):
                out["mask"] = files.abspath(masks[row["id"]])
            out.update({k: row[k] for k in CARRIED if k in row})
            rows.append(out)
    return sorted(rows, key=lambda r: r["id"])


def run_two_stage(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    retry_failed: bool = False,
    dry_run: bool = False,
) -> dict:
    """Runs the base job, then the refiner over its outputs; returns both summaries.

    ``failures`` is the two stages' sum (a base row that failed is not refined).
    ``dry_run`` plans the base stage only (the refiner's guides do not exist yet).
    """
    if not isinstance(workdir, str) or not workdir.strip():
        raise ConfigError(f"workdir: got {workdir!r}; expected a folder (local or gs://)")
    base_config, refiner_config = stage_configs(config, workdir)
    base_dir, refiner_dir = (files.join(workdir, stage) for stage in STAGES)
    checks.check_config(refiner_config)  # both stages' settings, before any work
    model_dir = refiner_config.model_dir
    if files.is_local(model_dir) and not os.path.exists(model_dir):
        raise checks.field_error(
            f"{BLOCK}.model_dir", model_dir, "the refiner's model folder (it does not exist here)"
        )
    base = run_job(base_config, base_dir, retry_failed=retry_failed, dry_run=dry_run)
    if dry_run:
        print("[refiner] edits the base's outputs once they exist (not planned in a dry run)")
        return {"workdir": workdir, "dry_run": True, "base": base, "failures": 0}
    guides = files.join(workdir, GUIDES)
    if jax.process_index() == 0:
        rows = refiner_rows(base_config, base_dir)
        files.publish_bytes(guides, "".join(json.dumps(r) + "\n" for r in rows).encode())
    multihost_utils.sync_global_devices("refiner guides")
    refiner = None
    if manifest.read_rows(guides)[0]:
        refiner = run_job(refiner_config, refiner_dir, retry_failed=retry_failed)
    failures = [stage["failures"] for stage in (base, refiner) if stage is not None]
    return {
        "workdir": workdir,
        "base": base,
        "refiner": refiner,
        "failures": None if None in failures else sum(failures),
    }
