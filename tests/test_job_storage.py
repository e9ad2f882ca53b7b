"""Jobs on non-local storage (TensorFlow's in-memory ram://) and the workdir fingerprint.

A job, its resume after a crash and model loading all run on ram:// with the
current folder set to an empty temporary folder, which must stay empty: no
path may fall back to the local disk. Every fingerprint field changed is
refused by name; the same config resumes; overwrite starts over.
"""

import io
import json
import os
import uuid

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sdedit_jax import pretrained
from sdedit_jax.jobs import manifest as job_manifest
from sdedit_jax.jobs import run as job
from sdedit_jax.jobs import sinks
from sdedit_jax.models import unet
from sdedit_jax.util import files
from sdedit_jax.util.config import load_config
from tests import job_cli

SIZE, TINY_MODEL = job_cli.SIZE, job_cli.TINY_MODEL
CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")


def _state(seed: int):
    return nnx.split(unet.build(unet.UNetConfig.from_config(TINY_MODEL), seed=seed))[1]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_guides(folder: str, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        files.publish_bytes(files.join(folder, f"g{i:02d}.png"), _png(pixels))
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[: 4 + i % 8] = 255
        files.publish_bytes(files.join(folder, "masks", f"g{i:02d}.png"), _png(mask))


@pytest.fixture(scope="module")
def store():
    """A fresh ram:// root with a tiny model and 10 guides (with masks)."""
    root = f"ram://sdedit-test-{uuid.uuid4().hex}"
    pretrained.save_model(files.join(root, "model"), _state(1), TINY_MODEL, {"name": "vp"}, "noise")
    _write_guides(files.join(root, "guides"), 10)
    return root


def _config(store: str, **changes):
    config = load_config(CONFIG_FILE)
    config.model_dir = files.join(store, "model")
    config.input.path = files.join(store, "guides")
    config.input.image_size = (SIZE, SIZE)
    config.t0s = (0.4,)
    config.sampler.steps_per_unit_time = 10
    config.per_device_batch = 1
    config.output.writer_threads = 2
    config.contact_sheet = False
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _tree(root: str) -> dict[str, bytes]:
    """Every output file of a workdir (relative path -> bytes), progress logs excluded."""
    out = {}
    for folder, _, names in files.walk(root):
        for name in names:
            path = files.join(folder, name)
            rel = files.relpath(path, root)
            if "throughput" not in rel and not rel.startswith("tensorboard"):
                out[rel] = files.read_bytes(path)
    return out


@pytest.mark.slow
def test_model_loading_from_ram_equals_local(store, tmp_path, monkeypatch):
    local = str(tmp_path / "model")
    pretrained.save_model(local, _state(1), TINY_MODEL, {"name": "vp"}, "noise")
    monkeypatch.chdir(tmp_path)
    from_ram = pretrained.load_model(files.join(store, "model"))
    from_disk = pretrained.load_model(local)
    assert from_ram.checksum == from_disk.checksum
    x = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
    t = np.array([0.3, 0.7], np.float32)
    np.testing.assert_array_equal(from_ram.score_fn(x, t), from_disk.score_fn(x, t))
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.slow
def test_job_and_resume_after_a_crash_on_ram_write_nothing_locally(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reference = files.join(store, "reference")
    result = job.run_job(_config(store), reference)
    assert result["edited"] == 10 and result["failures"] == 0 and result["complete"]
    rows = [
        json.loads(line)
        for line in files.read_lines(files.join(reference, "t0_0.40", "manifest.jsonl"))
    ]
    assert [r["id"] for r in rows] == [f"g{i:02d}.png" for i in range(10)]
    progress = [
        json.loads(line)
        for line in files.read_lines(files.join(reference, "t0_0.40", "throughput.p00000.jsonl"))
    ]
    assert progress[-1]["images_written"] == progress[-1]["total_images"] == 10
    board = files.listdir(files.join(reference, "tensorboard", "t0_0.40"))
    assert any(name.startswith("events.out.tfevents") for name in board)

    # Crash: the writer dies after its first batch; what it published stays, the rest is lost.
    crashed = files.join(store, "crashed")
    real_write = sinks.Sink._write_batch
    calls = {"n": 0}

    def dying_write(self, *args):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("simulated crash")
        return real_write(self, *args)

    monkeypatch.setattr(sinks.Sink, "_write_batch", dying_write)
    with pytest.raises(sinks.SinkError, match="simulated crash"):
        job.run_job(_config(store), crashed)
    monkeypatch.setattr(sinks.Sink, "_write_batch", real_write)
    partial = job_manifest.completed_ids(files.join(crashed, "t0_0.40"))
    assert 0 < len(partial) < 10

    resumed = job.run_job(_config(store), crashed)
    assert resumed["this_run"]["sub_jobs"][0]["skipped_done"] == len(partial)
    assert _tree(crashed) == _tree(reference)
    assert os.listdir(tmp_path) == []  # nothing fell back to the local disk


def test_gs_workdir_without_credentials_fails_at_once_with_nothing_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    config = load_config(CONFIG_FILE)
    with pytest.raises(files.StorageError, match=r"gs://sdedit-no-bucket/run: cannot write here"):
        job.run_job(config, "gs://sdedit-no-bucket/run")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_fingerprint_refuses_each_changed_field_and_resumes_the_same(store, tmp_path):
    other_model = files.join(store, "other_model")
    pretrained.save_model(other_model, _state(2), TINY_MODEL, {"name": "vp"}, "noise")
    other_sde = files.join(store, "other_sde")
    pretrained.save_model(
        other_sde, _state(1), TINY_MODEL, {"name": "vp", "beta_max": 10.0}, "noise"
    )
    workdir = str(tmp_path / "work")
    first = job.run_job(_config(store), workdir)
    assert first["edited"] == 10

    changes = {
        "model_sha256": {"model_dir": other_model},
        "sde.beta_max": {"model_dir": other_sde},
        "sampler.predictor": {"sampler.predictor": "reverse_diffusion"},
        "sampler.snr": {"sampler.corrector": "langevin", "sampler.snr": 0.2},
        "step_rule.steps_per_unit_time": {"sampler.steps_per_unit_time": 20},
        "repeats": {"repeats": 2},
        "seed_rule.seed": {"seed": 5},
        "t0s": {"t0s": (0.4, 0.6)},
        "guides.resize": {"input.resize": True},
        "output.npz": {"output.npz": "per_example"},
    }
    for field, change in changes.items():
        with pytest.raises(
            job.ConfigError,
            match=rf"another configuration \(its configuration "
            rf"differs: .*{field} .*--config.overwrite=True",
        ):
            job.run_job(_config(store, **change), workdir)
    # Settings that do not change an output may differ.
    same = job.run_job(_config(store, per_device_batch=2, **{"output.png_compression": 6}), workdir)
    assert same["this_run"]["sub_jobs"][0]["skipped_done"] == 10
    assert same["this_run"]["sub_jobs"][0]["edited"] == 0

    # overwrite: the old outputs go, the new configuration is recorded and run.
    redone = job.run_job(_config(store, seed=5, overwrite=True), workdir)
    assert redone["this_run"]["sub_jobs"][0]["edited"] == 10
    recorded = json.loads(open(os.path.join(workdir, "job_fingerprint.json")).read())
    assert recorded["seed_rule"]["seed"] == 5
    with pytest.raises(job.ConfigError, match=r"seed_rule.seed 5 -> 0"):
        job.run_job(_config(store), workdir)


@pytest.mark.slow
def test_t0_rule_edits_inputs_with_their_own_t0_once_and_dry_run_writes_nothing(store, capsys):
    rows = [
        {"path": f"guides/g{i:02d}.png", "mask": f"guides/masks/g{i:02d}.png"} for i in range(7)
    ]
    for i, t0 in ((4, 0.3), (5, 0.5), (6, 0.5)):
        rows[i]["t0"] = t0
    manifest = files.join(store, "rows.jsonl")
    files.publish_bytes(manifest, "".join(json.dumps(r) + "\n" for r in rows).encode())
    config = _config(
        store, **{"input.source": "manifest", "input.path": manifest, "t0s": (0.4, 0.6)}
    )
    workdir = files.join(store, "t0_rule")

    plan = job.run_job(config, workdir, dry_run=True)
    assert [(p["folder"], p["edit"], p["skip"]) for p in plan["plan"]] == [
        ("t0_0.40", 4, 0),
        ("t0_0.60", 4, 0),
        ("t0_per_example", 3, 0),
    ]
    assert "edit  guides/g05.png  (t0=0.5, " in capsys.readouterr().out
    assert not files.exists(workdir)  # a dry run writes nothing

    job.run_job(config, workdir)
    edited = {}
    for folder in ("t0_0.40", "t0_0.60", "t0_per_example"):
        lines = files.read_lines(files.join(workdir, folder, "manifest.jsonl"))
        edited[folder] = {r["id"]: r["t0"] for r in map(json.loads, lines)}
    plain = {f"guides/g{i:02d}.png" for i in range(4)}
    assert edited["t0_0.40"] == dict.fromkeys(plain, 0.4)
    assert edited["t0_0.60"] == dict.fromkeys(plain, 0.6)
    assert edited["t0_per_example"] == {
        "guides/g04.png": 0.3,
        "guides/g05.png": 0.5,
        "guides/g06.png": 0.5,
    }

    plan = job.run_job(config, workdir, dry_run=True)
    assert [(p["edit"], p["skip"]) for p in plan["plan"]] == [(0, 4), (0, 4), (0, 3)]
    assert "skip  guides/g04.png  (done" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_from_another_folder_takes_every_setting_and_dry_run_writes_nothing(tmp_path):
    """``configs/default.py`` and its demo inputs resolve from any folder; optional keys
    (None or empty in the file) are settable on the command line."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "sdedit_jax.main",
        "--config",
        "configs/default.py:quick",
        "--workdir",
        "out",
        "--dry_run",
        "--config.output.writer_threads=3",
        "--config.input.tfds.data_dir=/nowhere",
        "--config.input.tfds.name=unused",
        '--config.input.generator_kwargs={"num_colors": 4}',
        "--config.output.npz=shards",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "edit  edit_u1f34a.png  (t0=0.3, 6 network calls)" in proc.stdout
    assert os.listdir(tmp_path) == []  # a dry run writes nothing
