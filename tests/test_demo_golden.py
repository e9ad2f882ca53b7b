"""The README's main command against a recorded run: a refactor must not change a byte.

The demo (configs/default.py on the shipped model and bundled guides) is run as users
run it, and every file it writes that does not hold a clock reading is compared with
``tests/golden/demo.json``: exact sha256 on the machine that recorded it (same CPU model
and jax/jaxlib), and elsewhere the decoded images within a few grey levels (other CPUs
round float32 differently) with the same file list, manifest fields and row values.
``SDEDIT_RECORD_GOLDEN=1`` rewrites the record (only before a change, never to make it pass).
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jaxlib
import numpy as np
import pytest
from PIL import Image

from sdedit_jax.tools.timing import cpu_model_name
from tests import job_cli

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "demo.json")
# Files with clock readings, host names or process ids: throughput logs, TensorBoard
# events and the workdir lock.
TIMED = ("throughput.", "tensorboard/", ".lock")
# Manifest columns that hash or size an output (they follow the pixels).
OUTPUT_COLUMNS = ("output_sha256", "output_size")
# The per-row digest of a row's inputs covers the guide's absolute path, so it differs
# between clones; it is left out of the record (the resume tests prove what it does).
PATH_DIGESTS = ("inputs",)


def _machine() -> dict[str, str]:
    return {"cpu": cpu_model_name(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def _normalised(path: str, data: bytes) -> bytes:
    """Absolute paths of the clone are written relative to it, so any clone compares."""
    return data.replace(job_cli.REPO.encode() + b"/", b"<repo>/")


def _record(workdir: str) -> dict:
    files, manifests, images = {}, {}, {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, workdir)
            if any(part in rel for part in TIMED):
                continue
            with open(path, "rb") as f:
                data = _normalised(rel, f.read())
            if rel.endswith(".jsonl"):
                rows = [json.loads(line) for line in data.decode().splitlines()]
                rows = [{k: v for k, v in row.items() if k not in PATH_DIGESTS} for row in rows]
                data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
                if rel.endswith("manifest.jsonl"):
                    manifests[rel] = [
                        {k: v for k, v in row.items() if k not in OUTPUT_COLUMNS} for row in rows
                    ]
            files[rel] = hashlib.sha256(data).hexdigest()
            if rel.endswith(".png"):
                images[rel] = np.asarray(Image.open(path))
    return {"files": dict(sorted(files.items())), "manifests": manifests, "images": images}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    workdir = str(tmp_path_factory.mktemp("demo") / "demo")
    cmd = [
        job_cli.sys.executable,
        "-m",
        "sdedit_jax.main",
        "--config",
        "configs/default.py",
        f"--workdir={workdir}",
    ]
    proc = job_cli.run(cmd, devices=1, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _record(workdir)


def _golden_images(golden_dir: str) -> dict[str, np.ndarray]:
    with np.load(golden_dir) as z:
        return {name.replace("|", "/"): z[name] for name in z.files}


@pytest.mark.slow
def test_demo_matches_the_recorded_run(demo_run):
    images_path = GOLDEN.replace(".json", "_images.npz")
    if os.environ.get("SDEDIT_RECORD_GOLDEN") == "1":
        with open(GOLDEN, "w", encoding="utf-8") as f:
            record = {k: demo_run[k] for k in ("files", "manifests")}
            json.dump({"machine": _machine(), **record}, f, indent=1, sort_keys=True)
            f.write("\n")
        np.savez_compressed(
            images_path, **{k.replace("/", "|"): v for k, v in demo_run["images"].items()}
        )
        pytest.skip("golden record written")
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    assert sorted(demo_run["files"]) == sorted(golden["files"])
    assert demo_run["manifests"] == golden["manifests"]
    if golden["machine"] == _machine():
        assert demo_run["files"] == golden["files"]
    else:
        recorded = _golden_images(images_path)
        assert sorted(recorded) == sorted(demo_run["images"])
        for name, pixels in demo_run["images"].items():
            diff = np.abs(pixels.astype(int) - recorded[name].astype(int))
            assert diff.mean() < 1.0 and diff.max() <= 24, (name, diff.mean(), diff.max())
