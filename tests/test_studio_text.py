"""The studio with a text-to-image model: converted tiny random SD 1.x and SDXL folders.

Prompts are per-row arrays of one compiled program, part of the cache key, and saved
into manifest rows that ``python -m sdedit_jax.main`` edits to the previewed bytes.
"""

from __future__ import annotations

import base64
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sdedit_jax import convert, engine, pretrained
from sdedit_jax.data import names
from sdedit_jax.studio import dataset, previews
from tests import job_cli
from tests.test_studio import _serve, _wait

pytest.importorskip("torch", reason="the tiny SD folder is saved by diffusers")
pytest.importorskip("diffusers", reason="the tiny SD folder is saved by diffusers")
pytest.importorskip("transformers", reason="the tiny text encoder is saved by transformers")

from tests import sd_reference  # noqa: E402


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def sd_folder(request, tmp_path_factory):
    """A converted tiny SD 1.x folder, then an SDXL base one (its micro-conditioning the
    job's defaults: the guides' size, crop (0, 0))."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "sdxl":
        sd_reference.save_xl_pipeline(str(root / "pipe"))
    else:
        sd_reference.save_pipeline(str(root / "pipe"), "sd1")
    convert.convert(str(root / "pipe"), str(root / "converted"))
    return str(root / "converted")


@pytest.fixture(scope="module")
def sd_model(sd_folder):
    return pretrained.load_model(sd_folder)


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _request(model, prompt, seed=0, t0=0.6, guide_seed=0, **text):
    size = model.image_size
    guide = np.random.default_rng(guide_seed).integers(0, 256, (size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 4 :] = 255
    body = {"guide": _png(guide), "mask": _png(mask), "t0": t0, "seed": seed, "prompt": prompt}
    return {**body, **text}


def test_mixed_prompts_share_one_batch_and_one_program(sd_model):
    mixed = [
        _request(sd_model, "a red barn", seed=3, t0=0.4),
        _request(sd_model, "a cat", seed=3, t0=0.7, guide_seed=1, negative_prompt="blurry"),
        _request(sd_model, "", seed=8, guidance_scale=3.5),
    ]
    with _serve(sd_model, start=False) as (call, previewer):
        status, info = call("/api/info")
        assert status == 200 and info["takes_text"] and info["default_guidance_scale"] == 7.5
        programs, calls = engine.compiled_program_count(), previewer.engine_calls
        submitted = [call("/api/edit", body) for body in mixed]
        assert [status for status, _ in submitted] == [202, 202, 202]
        previewer.start()
        replies = [_wait(call, s)["results"][0]["png"] for s in submitted]
        assert previewer.engine_calls == calls + 1
        assert engine.compiled_program_count() == programs
    with _serve(sd_model) as (call, _):  # alone in its batch: its own prompt, the same bytes
        alone = _wait(call, call("/api/edit", mixed[1]))["results"][0]["png"]
    assert alone == replies[1]


def test_a_new_prompt_is_a_cache_miss_with_another_output(sd_model):
    with _serve(sd_model) as (call, previewer):
        first = _wait(call, call("/api/edit", _request(sd_model, "a red barn")))
        calls = previewer.engine_calls
        status, cached = call("/api/edit", _request(sd_model, "a red barn"))
        assert status == 200 and cached["results"] == first["results"]
        assert previewer.engine_calls == calls
        for change in ({"prompt": "a blue lake"}, {"negative_prompt": "dark"}):
            body = {**_request(sd_model, "a red barn"), **change}
            other = _wait(call, call("/api/edit", body))
            assert other["results"][0]["png"] != first["results"][0]["png"], change
        assert previewer.engine_calls == calls + 2


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"guidance_scale": -1}, "guidance_scale: expected a finite float32 >= 0, got -1"),
        ({"guidance_scale": "7"}, "guidance_scale: expected a finite float32 >= 0, got '7'"),
        ({"guidance_scale": 1e39}, "guidance_scale: expected a finite float32 >= 0, got 1e+39"),
        ({"guidance_scale": 10**400}, "guidance_scale: expected a finite float32 >= 0, got 1"),
        ({"prompt": 3}, "prompt: expected a string, got 3"),
    ],
)
def test_bad_text_fields_are_refused_by_name(change, reason):
    with pytest.raises(ValueError) as refused:
        previews.text_settings({"prompt": "x", **change}, takes_text=True)
    assert str(refused.value).startswith(reason)


@pytest.mark.slow
def test_saved_rows_run_in_the_job_to_the_previewed_bytes_with_their_prompts(
    sd_model, sd_folder, tmp_path
):
    folder = str(tmp_path / "dataset")
    edits = [
        _request(sd_model, "a red barn in snow", seed=5, t0=0.3, negative_prompt="blurry"),
        _request(sd_model, "un café à Paris", seed=2, guide_seed=2, guidance_scale=4.25),
        _request(sd_model, "a rocket", seed=1, guide_seed=3, guidance_scale=1.0),
    ]
    with _serve(sd_model, dataset_dir=folder, model_dir=sd_folder) as (call, _):
        previewed = [_wait(call, call("/api/edit", body))["results"][0] for body in edits]
        saved = [call("/api/save", body)[1] for body in edits]
    guided, unguided = saved[0]["command"], saved[2]["command"]
    assert saved[1]["command"] == guided != unguided
    assert os.path.basename(saved[2]["manifest"]) == dataset.manifest_name("fast", 1, True)
    with open(saved[0]["manifest"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["prompt"], r["negative_prompt"], r["guidance_scale"]) for r in rows] == [
        ("a red barn in snow", "blurry", 7.5),
        ("un café à Paris", "", 4.25),
    ]
    for command, expected in ((guided, previewed[:2]), (unguided, previewed[2:])):
        # The job as the studio's page shows it, on this machine's devices.
        result = job_cli.run(command, devices=jax.device_count(), timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        images = os.path.join(command[-1].removeprefix("--workdir="), "t0_per_example", "images")
        for preview in expected:
            with open(os.path.join(images, names.output_name(preview["id"])), "rb") as f:
                assert f.read() == base64.b64decode(preview["png"]), preview["id"]
