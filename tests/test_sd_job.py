"""Stable Diffusion batch jobs as users run them: ``python -m sdedit_jax.main``, configs/sd.py.

A converted tiny random SD folder edits the bundled photo guides (resized to 64 px with
their masks): prompts from sidecar captions, ``config.prompt`` and manifest columns,
guidance 7.5, masked rows exact outside their masks, a kill -9 and resume equal to an
uninterrupted run byte for byte, and every changed or bad text input named.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sdedit_jax import convert
from tests import job_cli

pytest.importorskip("torch", reason="the tiny SD folder is saved by diffusers")
pytest.importorskip("diffusers", reason="the tiny SD folder is saved by diffusers")
pytest.importorskip("transformers", reason="the tiny text encoder is saved by transformers")

from tests import sd_reference  # noqa: E402

SIDE = 64
LONG = "a very detailed photo of a red barn in the snow, " * 8  # > 77 tokens


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    sd_reference.save_pipeline(str(root / "pipe"), "sd1")
    convert.convert(str(root / "pipe"), str(root / "converted"))
    return str(root / "converted")


@pytest.fixture(scope="module")
def guides(tmp_path_factory):
    """The bundled photo guides and masks at 64 px, three with a sidecar caption."""
    folder = tmp_path_factory.mktemp("guides")
    job_cli.photo_guides(folder, SIDE)
    (folder / "paint_chelsea.txt").write_text("a cat on a sofa\n", encoding="utf-8")
    (folder / "edit_rocket.txt").write_text(LONG, encoding="utf-8")
    (folder / "paint_coffee.txt").write_text("", encoding="utf-8")  # an empty prompt is valid
    Image.open(folder / "paint_rocket.png").save(folder / "zz_bad_caption.png")
    Image.open(folder / "masks" / "paint_rocket.png").save(folder / "masks" / "zz_bad_caption.png")
    (folder / "zz_bad_caption.txt").write_bytes(b"a \xff\xfe rocket")  # not UTF-8
    return str(folder)


def _command(model_dir, source, workdir, *extra):
    kind = "manifest" if source.endswith(".jsonl") else "folder"
    return [
        sys.executable, "-m", "sdedit_jax.main", "--config", "configs/sd.py:sd15",
        f"--config.model_dir={model_dir}", f"--config.input.source={kind}",
        f"--config.input.path={source}", f"--config.input.image_size=({SIDE},{SIDE})",
        "--config.sampler.steps_per_unit_time=10", "--config.per_device_batch=2",
        "--config.contact_sheet=False", f"--workdir={workdir}", *extra,
    ]  # fmt: skip


def _outputs(workdir):
    folder = os.path.join(workdir, "t0_0.50", "images")
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module")
def reference(sd_folder, guides, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    done = job_cli.run(_command(sd_folder, guides, workdir, "--config.prompt=a photo"))
    assert done.returncode == 3, done.stderr[-3000:]  # the bad caption's row failed alone
    return workdir


@pytest.mark.slow
def test_prompts_come_from_captions_or_the_config_and_masks_keep_the_guide(reference, guides):
    rows = job_cli.rows(os.path.join(reference, "t0_0.50", "manifest.jsonl"))
    assert len(rows) == 10
    failed = job_cli.rows(os.path.join(reference, "t0_0.50", "failures.jsonl"))
    assert list(failed) == ["zz_bad_caption.png"]
    assert "zz_bad_caption.txt" in failed["zz_bad_caption.png"]["reason"]
    assert "UTF-8" in failed["zz_bad_caption.png"]["reason"]
    assert rows["paint_chelsea.png"]["prompt"] == "a cat on a sofa"
    assert rows["paint_coffee.png"]["prompt"] == ""
    assert rows["edit_astronaut.png"]["prompt"] == "a photo"
    assert rows["edit_rocket.png"]["prompt"] == LONG.strip()
    assert [r["prompt_truncated"] for r in rows.values()].count(True) == 1
    assert rows["edit_rocket.png"]["prompt_truncated"]
    assert {r["guidance_scale"] for r in rows.values()} == {7.5}
    for name in ("edit_astronaut.png", "composite_cup_on_rocket.png"):
        mask = np.asarray(Image.open(os.path.join(guides, "masks", name))) == 0
        guide = np.asarray(Image.open(os.path.join(guides, name)).convert("RGB"))
        out = np.asarray(Image.open(os.path.join(reference, "t0_0.50", "images", name)))
        assert mask.any() and (~mask).any()
        np.testing.assert_array_equal(out[mask], guide[mask])
        assert np.abs(out[~mask].astype(int) - guide[~mask]).mean() > 1  # edited inside


@pytest.mark.slow
def test_kill_9_and_resume_equal_the_uninterrupted_run(sd_folder, guides, reference, tmp_path):
    workdir = str(tmp_path / "killed")
    cmd = _command(sd_folder, guides, workdir, "--config.prompt=a photo")
    proc = subprocess.Popen(
        cmd, cwd=job_cli.REPO, env=job_cli.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    images = os.path.join(workdir, "t0_0.50", "images")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.isdir(images) and len(os.listdir(images)) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    done = job_cli.run(cmd)
    assert done.returncode == 3, done.stderr[-3000:]
    assert _outputs(workdir) == _outputs(reference)


@pytest.mark.slow
def test_another_config_prompt_is_refused_by_the_fingerprint(sd_folder, guides, reference):
    done = job_cli.run(_command(sd_folder, guides, reference, "--config.prompt=a painting"))
    assert done.returncode == 2
    message = " ".join(job_cli.error_lines(done.stderr))
    assert "text" in message and "a painting" in message, message


@pytest.mark.slow
def test_manifest_text_columns_changed_prompts_and_bad_rows_are_named(sd_folder, guides, tmp_path):
    rows = [
        {"id": "a", "path": os.path.join(guides, "paint_chelsea.png"), "prompt": "a cat"},
        {"id": "b", "path": os.path.join(guides, "paint_rocket.png"), "prompt": "a rocket",
         "negative_prompt": "blurry", "guidance_scale": 1.0},
        {"id": "c", "path": os.path.join(guides, "edit_coffee.png"), "prompt": "cup",
         "guidance_scale": -2},
        {"id": "d", "path": os.path.join(guides, "edit_chelsea.png")},
    ]  # fmt: skip
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    workdir = str(tmp_path / "run")
    done = job_cli.run(_command(sd_folder, str(manifest), workdir))
    assert done.returncode == 3, done.stderr[-3000:]  # some rows failed, the rest edited
    sub = os.path.join(workdir, "t0_0.50")
    edited = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
    assert sorted(edited) == ["a", "b"]
    assert (edited["b"]["negative_prompt"], edited["b"]["guidance_scale"]) == ("blurry", 1.0)
    failed = job_cli.rows(os.path.join(sub, "failures.jsonl"))
    assert "guidance_scale" in failed["c"]["reason"] and "-2" in failed["c"]["reason"]
    assert "prompt" in failed["d"]["reason"] and "config.prompt" in failed["d"]["reason"]

    rows[0]["prompt"] = "a dog"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    again = job_cli.run(_command(sd_folder, str(manifest), workdir))
    failed = job_cli.rows(os.path.join(sub, "failures.jsonl"))
    assert failed["a"]["inputs_changed"] == "prompt", again.stderr[-2000:]
    assert "'a cat' then, 'a dog' now" in failed["a"]["reason"]


@pytest.mark.slow
def test_a_size_off_the_vae_grid_and_text_for_a_pixel_model_are_one_line(sd_folder, guides):
    off = _command(sd_folder, guides, "/tmp/unused", "--config.prompt=x")
    off[off.index(f"--config.input.image_size=({SIDE},{SIDE})")] = (
        "--config.input.image_size=(63,64)"
    )
    done = job_cli.run(off)
    assert done.returncode == 2
    lines = job_cli.error_lines(done.stderr)
    assert len(lines) == 1 and "multiples of 2" in lines[0], lines
    pixel = job_cli.command("default", guides, "/tmp/unused2", "--config.prompt=a cat")
    done = job_cli.run(pixel)
    assert done.returncode == 2
    lines = job_cli.error_lines(done.stderr)
    assert len(lines) == 1 and "prompt" in lines[0] and "pixel model" in lines[0], lines
