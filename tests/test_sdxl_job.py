"""SDXL batch jobs: ``python -m sdedit_jax.main --config configs/sdxl.py:<variant>`` over
the bundled photo guides with converted tiny random SDXL folders (base and refiner). A
job's output equals the Python API's edit of the same rows (micro-conditioning from the
guides' size, the pipelines' zero negative), masks keep the guide, and a changed
micro-conditioning setting is refused by the fingerprint."""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import sdedit_jax as sj
from sdedit_jax import convert, engine, rng
from sdedit_jax.jobs import checks
from sdedit_jax.latent import guidance
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.util.config import load_config
from tests import job_cli

pytest.importorskip("torch", reason="the tiny SDXL folders are saved by diffusers")
pytest.importorskip("diffusers", reason="the tiny SDXL folders are saved by diffusers")
pytest.importorskip("transformers", reason="the tiny text encoders are saved by transformers")

from tests import sd_reference  # noqa: E402

SIDE = 32
NAMES = ("edit_astronaut.png", "paint_chelsea.png")


@pytest.fixture(scope="module", params=["base", "refiner"])
def variant(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"sdxl_{request.param}")
    sd_reference.save_xl_pipeline(str(root / "pipe"), refiner=request.param == "refiner")
    convert.convert(str(root / "pipe"), str(root / "converted"))
    guides = root / "guides"
    job_cli.photo_guides(guides, SIDE, NAMES)
    return request.param, str(root / "converted"), str(guides), root


def _command(variant, model_dir, guides, workdir, *extra):
    return [
        sys.executable, "-m", "sdedit_jax.main", "--config", f"configs/sdxl.py:{variant}",
        f"--config.model_dir={model_dir}", f"--config.input.path={guides}",
        f"--config.input.image_size=({SIDE},{SIDE})", "--config.sampler.steps_per_unit_time=10",
        "--config.per_device_batch=1", "--config.contact_sheet=False",
        "--config.output.npz=per_example",
        "--config.prompt=a photo", f"--workdir={workdir}", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_job_is_the_python_apis_edit_and_refuses_other_micro_conditioning(variant):
    name, model_dir, guides, root = variant
    workdir = str(root / "run")
    done = job_cli.run(_command(name, model_dir, guides, workdir))
    assert done.returncode == 0, done.stderr[-3000:]
    t0 = {"base": 0.6, "refiner": 0.3}[name]
    sub = os.path.join(workdir, f"t0_{t0:.2f}")
    rows = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
    assert sorted(rows) == sorted(NAMES) and {r["prompt"] for r in rows.values()} == {"a photo"}

    model = sj.load_model(model_dir)
    images = np.stack([np.asarray(Image.open(os.path.join(guides, n))) for n in NAMES])
    x = images.astype(np.float32) / 127.5 - 1
    masks = np.stack([
        np.asarray(Image.open(os.path.join(guides, "masks", n))) > 0
        if os.path.exists(os.path.join(guides, "masks", n)) else np.ones((SIDE, SIDE), bool)
        for n in NAMES
    ]).astype(np.float32)[..., None]  # fmt: skip
    h, pooled = model.encode_text(model.tokenize(["a photo"] * 2))
    ids = model.time_ids([(SIDE, SIDE)] * 2, (0, 0), None, 6.0)
    negative_ids = model.time_ids([(SIDE, SIDE)] * 2, (0, 0), None, 2.5)
    if model.force_zeros_for_empty_prompt:
        nh, npooled = 0 * h, 0 * pooled
    else:
        nh, npooled = model.encode_text(model.tokenize(["", ""]))
    cond = guidance.text_condition(
        model.condition(h, pooled, ids), model.condition(nh, npooled, negative_ids), [5.0, 5.0]
    )
    steps = int(np.ceil(10 * t0))
    editor = engine.Editor(
        model.sde, Sampler("sde_dpm_solver_2m", max_steps=steps),
        mesh=engine.data_mesh(jax.devices()[:1]), per_device_batch=2,
    )  # fmt: skip
    batch = engine.EditBatch(
        guides=x, seeds=np.zeros(2, np.int32), id_words=rng.string_id_words(list(NAMES)),
        t0=np.full(2, t0, np.float32), n_steps=np.full(2, steps, np.int32), mask=masks, cond=cond,
    )  # fmt: skip
    out = np.asarray(editor.run(editor.place_score(model.score_fn, model.codec), batch))
    for i, n in enumerate(NAMES):
        found = np.load(os.path.join(sub, "arrays", os.path.splitext(n)[0] + ".npz"))
        np.testing.assert_allclose(found["image"], out[i], atol=1e-5)
        keep = masks[i, ..., 0] == 0
        png = np.asarray(Image.open(os.path.join(sub, "images", n)))
        np.testing.assert_array_equal(png[keep], images[i][keep])

    again = job_cli.run(
        _command(name, model_dir, guides, workdir, "--config.sdxl.aesthetic_score=7.0")
    )
    assert again.returncode == 2
    message = " ".join(job_cli.error_lines(again.stderr))
    assert "micro_conditioning.aesthetic_score" in message, message


def test_micro_conditioning_is_refused_by_name_for_other_models():
    config = load_config(os.path.join(job_cli.REPO, "configs", "default.py"))
    config.sdxl.aesthetic_score = 7.0
    job = checks.check_config(config)
    message = r"^config\.sdxl\.aesthetic_score: got 7\.0; expected 6\.0 \(the default\)"
    with pytest.raises(checks.ConfigError, match=message):
        checks.text_inputs(job, checks.load_model("default"))
    config.sdxl.aesthetic_score = float("nan")
    with pytest.raises(checks.ConfigError, match=r"^config\.sdxl\.aesthetic_score: got nan"):
        checks.check_config(config)
