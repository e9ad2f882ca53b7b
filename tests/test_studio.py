"""The studio's JSON API, through a real HTTP server in this process (a tiny model)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sdedit_jax import engine, pretrained
from sdedit_jax.data import names
from sdedit_jax.studio import presets, previews, server
from tests import job_cli

SIZE = job_cli.SIZE


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _mask(left: int, right: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, left:right] = 255
    return mask


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return pretrained.load_model(tiny_model_dir)


@contextlib.contextmanager
def _serve(model, *, start=True, dataset_dir=None, model_dir="default", token=None, **kw):
    """A studio on a free loopback port; yields ``(call, previewer)``."""
    previewer = previews.Previewer(model, per_device_batch=1, **kw)
    previewer.warm((presets.DEFAULT_PRESET,))  # every preset: test_start_up_compiles_...
    studio = server.Studio(previewer, model_dir, dataset_dir, token, max_upload_bytes=1 << 16)
    httpd = server.StudioServer(("127.0.0.1", 0), studio)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    if start:
        previewer.start()
    port = httpd.server_address[1]

    def call(path, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        yield call, previewer
    finally:
        httpd.shutdown()
        httpd.server_close()
        previewer.stop()


def _request(seed=0, t0=0.5, mask=(4, 12), samples=1, guide_seed=0):
    body = {"guide": _png(job_cli.random_guide(guide_seed)), "t0": t0, "seed": seed}
    body["samples"] = samples
    if mask is not None:
        body["mask"] = _png(_mask(*mask))
    return body


def _wait(call, status_reply):
    status, reply = status_reply
    assert status in (200, 202), reply
    status, reply = call(f"/api/jobs/{reply['job']}?wait=60")
    assert status == 200 and reply["status"] == "done", reply
    return reply


def test_edit_keeps_pixels_outside_the_mask_and_samples_differ(model):
    with _serve(model) as (call, _):
        reply = _wait(call, call("/api/edit", _request(samples=2)))
    guide = job_cli.random_guide(0)
    first, second = (_pixels(r["png"]) for r in reply["results"])
    assert first.shape == guide.shape and reply["finished"] == reply["total"] == 2
    np.testing.assert_array_equal(first[:, :4], guide[:, :4])
    np.testing.assert_array_equal(first[:, 12:], guide[:, 12:])
    assert np.abs(first[:, 4:12].astype(int) - guide[:, 4:12]).mean() > 5
    assert not np.array_equal(first, second)  # seeds 0 and 1
    assert [r["seed"] for r in reply["results"]] == [0, 1]


def test_mixed_requests_share_one_batch_and_one_program(model):
    with _serve(model, start=False) as (call, previewer):
        programs, calls = engine.compiled_program_count(), previewer.engine_calls
        mixed = [
            _request(seed=3, t0=0.3, mask=(0, 8)),
            _request(seed=9, t0=0.8, mask=None, guide_seed=1),
            _request(seed=1, t0=0.55, mask=(2, 5), samples=2),
        ]
        submitted = [call("/api/edit", body) for body in mixed]
        assert [status for status, _ in submitted] == [202, 202, 202]
        previewer.start()
        replies = [_wait(call, s) for s in submitted]
        assert previewer.engine_calls == calls + 1  # one batch of all four rows
        assert engine.compiled_program_count() == programs
    alone = _serve(model)
    with alone as (call, _):  # each row alone in its own batch: the same bytes
        again = _wait(call, call("/api/edit", mixed[1]))
    assert again["results"][0]["png"] == replies[1]["results"][0]["png"]


def test_identical_request_is_served_from_the_cache(model):
    with _serve(model) as (call, previewer):
        first = _wait(call, call("/api/edit", _request(seed=4)))
        calls = previewer.engine_calls
        status, second = call("/api/edit", _request(seed=4))
        assert status == 200 and second["status"] == "done"
        assert second["results"] == first["results"]
        assert previewer.engine_calls == calls
        _wait(call, call("/api/edit", _request(seed=4, t0=0.6)))  # a new setting: computed
        assert previewer.engine_calls == calls + 1


def test_a_full_queue_answers_busy(model):
    with _serve(model, start=False, max_queue=3) as (call, _):
        assert call("/api/edit", _request(samples=2))[0] == 202
        status, reply = call("/api/edit", _request(seed=7, samples=2))
        assert status == 503 and reply["error"].startswith("busy: queue: 2 previews waiting")
        assert call("/api/edit", _request(seed=7))[0] == 202  # one more still fits


@pytest.mark.parametrize(
    "change, status, reason",
    [
        (
            {"guide": _png(np.zeros((8, 8, 3), np.uint8)), "mask": None},
            400,
            "guide (upload): size 8x8",
        ),
        ({"guide": base64.b64encode(b"GIF89a....").decode()}, 400, "guide: expected a PNG"),
        ({"mask": _png(np.full((SIZE, SIZE, 3), (0, 9, 0), np.uint8))}, 400, "mask (upload): RGB"),
        ({"guide": "###"}, 400, "guide: not valid base64"),
        ({"t0": 1.5}, 400, "t0: expected a number in"),
        ({"samples": 0}, 400, "samples: expected an integer in [1, 8]"),
        ({"preset": "slow"}, 400, "preset: expected one of"),
        ({"prompt": "a cat"}, 400, "prompt: this model takes no text, got 'a cat'"),
        ({"negative_prompt": "dark"}, 400, "negative_prompt: this model takes no text"),
        ({"guidance_scale": 7.5}, 400, "guidance_scale: this model takes no text, got 7.5"),
        ({"padding": "x" * (1 << 16)}, 413, "upload: "),
    ],
)
def test_bad_uploads_are_refused_naming_the_field(model, change, status, reason):
    with _serve(model) as (call, _):
        got, reply = call("/api/edit", {**_request(), **change})
    assert got == status and reply["error"].startswith(reason), reply


def test_start_up_compiles_every_preset_so_no_request_compiles(model):
    # per_device_batch=3: programs no other test compiles, so the warm-up's own show.
    previewer = previews.Previewer(model, per_device_batch=3)
    before = engine.compiled_program_count()
    previewer.warm()
    after = engine.compiled_program_count()
    assert after == before + len(presets.PRESETS)
    previewer.start()
    try:
        for name in presets.PRESETS:
            rows = previews.make_rows(
                b"guide", None, job_cli.random_guide(0).astype(np.float32) / 255,
                np.ones((SIZE, SIZE, 1), np.float32),
                previews.Settings(0.4, 1, 0, 2, name),
            )  # fmt: skip
            job = previewer.submit(rows)
            assert job.done.wait(60) and not job.error, job.error
    finally:
        previewer.stop()
    assert engine.compiled_program_count() == after


def test_token_and_loopback(model):
    with _serve(model, token="s3cret") as (call, _):
        assert call("/api/info")[0] == 403
        status, info = call("/api/info", headers={"X-Studio-Token": "s3cret"})
        assert status == 200 and info["image_size"] == SIZE
    previewer = previews.Previewer(model)
    with pytest.raises(ValueError, match="host: '0.0.0.0' is not loopback; pass --token"):
        server.StudioServer(("0.0.0.0", 0), server.Studio(previewer, "default"))


@pytest.mark.slow
def test_saved_dataset_runs_in_the_job_to_the_previewed_bytes(model, tiny_model_dir, tmp_path):
    dataset = str(tmp_path / "dataset")
    edits = [_request(seed=5, t0=0.3, mask=(3, 11)), _request(seed=2, t0=0.7, guide_seed=2)]
    with _serve(model, dataset_dir=dataset, model_dir=tiny_model_dir) as (call, _):
        previewed = [_wait(call, call("/api/edit", body))["results"][0] for body in edits]
        saved = [call("/api/save", body) for body in edits]
    assert [status for status, _ in saved] == [200, 200]
    command = saved[0][1]["command"]
    assert command == saved[1][1]["command"]
    with open(saved[0][1]["manifest"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [np.float32(r["t0"]) for r in rows] == [np.float32(0.3), np.float32(0.7)]
    result = job_cli.run(command, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    workdir = command[-1].removeprefix("--workdir=")
    for preview in previewed:
        path = os.path.join(workdir, "t0_per_example", "images", names.output_name(preview["id"]))
        with open(path, "rb") as f:
            assert f.read() == base64.b64decode(preview["png"]), preview["id"]


def test_composite_pastes_the_box_and_masks_its_region(model):
    target, source = job_cli.random_guide(3), job_cli.random_guide(4)[:10, :12]
    body = {"target": _png(target), "source": _png(source), "box": [2, 1, 7, 5], "at": [9, 10]}
    with _serve(model) as (call, _):
        status, reply = call("/api/composite", body)
        bad_status, bad = call("/api/composite", {**body, "at": [14, 10]})
    assert status == 200, reply
    expected = target.copy()
    expected[10:14, 9:14] = source[1:5, 2:7]
    expected_mask = np.zeros((SIZE, SIZE), np.uint8)
    expected_mask[10:14, 9:14] = 255
    np.testing.assert_array_equal(_pixels(reply["guide"]), expected)
    np.testing.assert_array_equal(_pixels(reply["mask"]), expected_mask)
    assert bad_status == 400 and bad["error"].startswith("at: the 5x4 region at 14,10"), bad
