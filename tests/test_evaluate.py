"""The evaluation sweep: end to end from the command line, and against closed forms.

Truths used: with the exact score of Gaussian data, SDEdit's output per pixel
is Gaussian with known mean and variance (``sdedit_jax.tools.gaussian_reference``), so the
expected squared distance to the guide, E||x - g||^2 = (mean - g)^2 + var, is
known and grows with t0; the guides scored as outputs are at L2 = 0; masked
tasks keep the guide exactly outside the mask; one program serves every t0.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdedit_jax import engine, evaluation, pretrained
from sdedit_jax.metrics import realism
from sdedit_jax.sde import VPSDE
from sdedit_jax.tools.gaussian_reference import GaussianScore, sdedit_moments
from sdedit_jax.util.config import load_config
from tests import job_cli
from tests.tensorboard_events import tensorboard_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = job_cli.SIZE
# Gaussian data N(MU, S^2) per pixel; guides in [-0.4, 0.4] keep outputs far from the
# [-1, 1] clip, so clipping (done before scoring) cannot bias the closed form.
MU, S = 0.0, 0.2
# Small t0s: beyond ~0.3 the output is nearly the prior and the t0s become hard to tell apart.
GAUSSIAN_T0S = (0.1, 0.3)


def _write_pictures(folder, count, seed):
    """Squares of random colour on white, like small emoji."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = np.full((SIZE, SIZE, 3), 255, np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, SIZE - 5, 2)
            pixels[y : y + 6, x : x + 6] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(os.path.join(folder, f"p{i:03d}.png"))
    return folder


def _write_flat_guides(folder, count, seed):
    """Guides with pixel values in [77, 179] / 127.5 - 1, i.e. within [-0.4, 0.4]."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(77, 180, (SIZE, SIZE, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"g{i:03d}.png"))
    return folder


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return _write_pictures(str(tmp_path_factory.mktemp("reference")), 12, seed=1)


class PooledPixels:
    """Cheap stand-in realism features (4x4 average-pooled pixels) for tests about faithfulness.

    EfficientNet's 1280-d features make every FID a 1280x1280 eigendecomposition;
    the command-line test covers them.
    """

    name = "pooled_pixels_4x4"
    dim = 4 * 4 * 3

    def __call__(self, images):
        images = np.asarray(images, np.float32)
        batch, height, width, channels = images.shape
        pooled = images.reshape(batch, 4, height // 4, 4, width // 4, channels).mean(axis=(2, 4))
        return pooled.reshape(batch, self.dim)


def _tiny_config():
    return load_config(os.path.join(REPO, "configs", "eval_tiny.py"))


def _finite(value):
    return value not in ("", None) and np.isfinite(float(value))


@pytest.mark.slow
def test_cli_sweep_writes_every_output(tiny_model_dir, reference_dir, tmp_path):
    guides = _write_pictures(str(tmp_path / "guides"), 8, seed=0)
    workdir = str(tmp_path / "eval")
    cache = os.environ.get("SDEDIT_JAX_CACHE", os.path.join(REPO, ".jax_cache"))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_COMPILATION_CACHE_DIR=cache,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdedit_jax.evaluate",
            "--config",
            "configs/eval_tiny.py",
            f"--config.model_dir={tiny_model_dir}",
            f"--config.input.path={guides}",
            f"--config.reference.paths=('{reference_dir}',)",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "img/s" in proc.stderr and "KID" in proc.stdout

    with open(os.path.join(workdir, "results.csv")) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == evaluation.report.COLUMNS
        rows = list(reader)
    settings = [(r["task"], r["variant"], float(r["t0"])) for r in rows]
    assert settings == [
        ("stroke_painting", "guides", 0.0),
        ("stroke_edit", "guides", 0.0),
        ("stroke_painting", "base", 0.3),
        ("stroke_painting", "base", 0.7),
        ("stroke_edit", "base", 0.3),
        ("stroke_edit", "base", 0.7),
    ]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert [r["task"] for r in results["rows"]] == [r["task"] for r in rows]
    for row in rows:
        assert int(row["examples"]) == 8
        for column in ("l2", "mse", "ssim", "kid", "kid_std", "fid"):
            assert _finite(row[column]), (row, column)
        masked = row["task"] == "stroke_edit"
        assert _finite(row["l2_outside"]) == masked
        if row["variant"] == "guides":
            assert float(row["l2"]) == 0.0 and float(row["ssim"]) == pytest.approx(1.0)
            assert row["psnr"] == "inf"
        else:
            assert _finite(row["psnr"]) and float(row["l2"]) > 0
            # The engine pastes the guide back outside the (binary) mask.
            assert not masked or float(row["l2_outside"]) == 0.0
    for task in ("stroke_painting", "stroke_edit"):
        l2 = [float(r["l2"]) for r in rows if r["task"] == task]
        assert l2 == sorted(l2) and len(set(l2)) == 3, (task, l2)
    assert [r["n_steps"] for r in rows[2:4]] == ["6", "14"]  # ceil(20 * t0)
    for name in (
        "realism_faithfulness.png",
        "contact_stroke_painting_base.png",
        "contact_stroke_edit_base.png",
    ):
        with Image.open(os.path.join(workdir, name)) as image:
            assert min(image.size) > 100
    # Every setting's scores also reach TensorBoard, one curve per task/variant over 1000 * t0.
    board = tensorboard_scalars(os.path.join(workdir, "tensorboard", "scores"))
    for row in rows[2:]:
        tag = f"{row['task']}/{row['variant']}/kid"
        assert board[(round(1000 * float(row["t0"])), tag)] == pytest.approx(float(row["kid"]))


def _gaussian_config(guides, reference):
    config = _tiny_config()
    config.input.path = guides
    config.reference.paths = (reference,)
    config.tasks = ("none",)
    config.max_guides = 16
    config.t0s = GAUSSIAN_T0S
    config.sampler.steps_per_unit_time = 400
    config.sampler.denoise = False  # the closed form is the law of the state at eps
    config.per_device_batch = 2
    config.seed = 3
    return config


def _gaussian_sweep(tmp_path, reference_dir, count):
    """(SDE, guides folder, exact-score model, config) of a sweep over ``count`` flat guides."""
    sde = VPSDE()
    guides_dir = _write_flat_guides(str(tmp_path / "guides"), count, seed=5)
    model = pretrained.LoadedModel(GaussianScore(sde, MU, S), sde, SIZE, 3, "gaussian", "")
    config = _gaussian_config(guides_dir, reference_dir)
    config.max_guides = count
    return sde, guides_dir, model, config


def _expected_mse(sde, guides, t0):
    """E[mean over pixels of ((x - g) / 2)^2] and its standard error for one mean of all pixels."""
    mean, var = sdedit_moments(sde, MU, S, guides, t0, sde.eps)
    # In [0, 1] units the difference is halved.
    squared = ((mean - guides) ** 2 + var) / 4
    per_pixel_var = (2 * var**2 + 4 * var * (mean - guides) ** 2) / 16
    return float(squared.mean()), float(np.sqrt(per_pixel_var.sum()) / guides.size)


@pytest.mark.slow
def test_gaussian_sweep_matches_closed_form_and_is_deterministic(
    reference_dir, tmp_path, monkeypatch
):
    sde, guides_dir, model, config = _gaussian_sweep(tmp_path, reference_dir, 16)
    workdir = str(tmp_path / "eval")
    before = engine.compiled_program_count()
    results = evaluation.run_evaluation(config, workdir, model, PooledPixels())
    assert engine.compiled_program_count() - before == 1  # one program for every t0

    guides = np.stack(
        [
            np.asarray(Image.open(os.path.join(guides_dir, f"g{i:03d}.png")), np.float64) / 127.5
            - 1
            for i in range(16)
        ]
    )
    baseline, *rows = results["rows"]
    assert baseline["t0"] == 0.0 and baseline["l2"] == 0.0 and baseline["mse"] == 0.0
    for row, t0 in zip(rows, GAUSSIAN_T0S, strict=True):
        expected, stderr = _expected_mse(sde, guides, t0)
        # 5 standard errors of sampling noise plus 2% for the Euler-Maruyama discretisation.
        assert abs(row["mse"] - expected) < 5 * stderr + 0.02 * expected, (t0, row, expected)
        assert row["n_steps"] == int(np.ceil(400 * t0))
    assert rows[0]["l2"] < rows[1]["l2"]
    assert not results["reference_cache_hit"]

    # Recomputed from scratch (no cached outputs): the same rows.
    cached = os.path.join(workdir, "outputs")
    assert len([n for n in os.listdir(cached) if n.endswith(".npz")]) == len(GAUSSIAN_T0S)
    shutil.rmtree(cached)
    again = evaluation.run_evaluation(config, workdir, model, PooledPixels())
    assert again["reference_cache_hit"]
    timing = ("seconds", "images_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(results["rows"])
    # A resumed run reads finished settings and their scores back instead of redoing them:
    # features are extracted only for the guides' own baseline row.
    stamps = {f: os.stat(os.path.join(cached, f)).st_mtime_ns for f in os.listdir(cached)}
    extracted = []
    extract = evaluation.scoring.image_features
    monkeypatch.setattr(
        evaluation.scoring,
        "image_features",
        lambda *args: extracted.append(len(args[1])) or extract(*args),
    )
    resumed = evaluation.run_evaluation(config, workdir, model, PooledPixels())
    assert extracted == [16]
    assert resumed["rows"] == again["rows"]
    assert stamps == {f: os.stat(os.path.join(cached, f)).st_mtime_ns for f in os.listdir(cached)}
    # Its progress counts only the work left (none), not the settings it read back.
    with open(os.path.join(workdir, "throughput.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    assert last["total_images"] == last["images_written"] == 0


def test_samples_per_guide_gives_each_copy_its_own_id():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    guides = evaluation.inputs.ImageSet("task", ["a.png", "b.png"], images, np.ones((2, 4, 4, 1)))
    tiled = evaluation.inputs.with_samples(guides, 3)
    assert tiled.ids == ["a.png", "b.png", "a.png#1", "b.png#1", "a.png#2", "b.png#2"]
    np.testing.assert_array_equal(tiled.images[4], images[0])
    with pytest.raises(ValueError, match="config.samples_per_guide: must be a positive int"):
        evaluation.inputs.with_samples(guides, 0)


@pytest.mark.parametrize("count", [6, 40, 41, 60])
def test_fid_to_reference_equals_the_metric_module(count):
    """The n x n shortcut (n <= d) and the fallback agree with realism.fid (d = 40)."""
    rng = np.random.default_rng(count)
    reference = rng.standard_normal((200, 40)) @ rng.standard_normal((40, 40)) * 0.3 + 1.0
    features = rng.standard_normal((count, 40)) @ rng.standard_normal((40, 40)) * 0.2 + 0.5
    value = realism.fid_to_reference(features, realism.stats_from_features(reference))
    assert value == pytest.approx(realism.fid(features, reference), rel=1e-6)


def test_config_errors_name_the_field(reference_dir, tmp_path):
    sde = VPSDE()
    config = _tiny_config()
    config.variants = ({"predicter": "ode_euler"},)
    with pytest.raises(ValueError, match=r"config.variants\[0\]: unknown key.*predicter"):
        evaluation.inputs.variants_from_config(config)
    config.variants = ({"name": "a", "n_steps": 5, "steps_per_unit_time": 5},)
    with pytest.raises(ValueError, match=r"config.variants\[0\]: sampler: set exactly one"):
        evaluation.inputs.variants_from_config(config)
    with pytest.raises(ValueError, match=r"config.t0s: \[1.5\] outside"):
        evaluation.inputs.check_t0s((0.5, 1.5), sde)
    config = _tiny_config()
    config.input.generator = "composite"
    with pytest.raises(ValueError, match=r"config.input: do not set \['generator'\]"):
        evaluation.inputs.load_guides(config, "stroke_painting", SIZE, 3)
    bad = tmp_path / "bad"
    _write_pictures(str(bad), 2, seed=0)
    Image.new("RGB", (SIZE + 1, SIZE)).save(bad / "wide.png")
    config = _tiny_config()
    config.input.path = str(bad)
    with pytest.raises(ValueError, match=r"(?s)1 input\(s\) failed.*wide.png"):
        evaluation.inputs.load_guides(config, "stroke_painting", SIZE, 3)


def test_a_named_task_runs_its_generator_with_its_own_settings(reference_dir):
    """One generator twice: the named task's settings (2 colours) reach the generator."""
    config = _tiny_config()
    config.input.path = reference_dir
    config.generator_kwargs.two_colours = {"generator": "stroke_painting", "num_colors": 2}
    default = evaluation.inputs.load_guides(config, "stroke_painting", SIZE, 3)
    named = evaluation.inputs.load_guides(config, "two_colours", SIZE, 3)
    assert named.name == "two_colours" and named.ids == default.ids
    for image in named.images:
        assert len(np.unique(image.reshape(-1, 3), axis=0)) <= 2
    assert max(len(np.unique(image.reshape(-1, 3), axis=0)) for image in default.images) > 2
    config.generator_kwargs.typo = {"generator": "stroke_paintng"}
    with pytest.raises(ValueError, match="task 'typo' uses generator 'stroke_paintng'"):
        evaluation.inputs.load_guides(config, "typo", SIZE, 3)


@pytest.mark.parametrize("variant", [None, "quick", "samplers", "tasks", "few_step"])
def test_emoji_eval_configs_resolve(variant):
    """Every variant of configs/eval_emoji.py names known samplers, generators and t0s."""
    config = load_config(os.path.join(REPO, "configs", f"eval_emoji.py:{variant or ''}"))
    assert [v.name for v in evaluation.inputs.variants_from_config(config)][0] == "base"
    for task in config.tasks:
        evaluation.inputs.task_generator(config, task)
    evaluation.inputs.check_t0s(config.t0s, VPSDE())


def test_a_stopped_setting_resumes_from_its_last_finished_batch(
    reference_dir, tmp_path, monkeypatch
):
    _, _, model, config = _gaussian_sweep(tmp_path, reference_dir, 32)
    config.t0s = (0.3,)
    config.per_device_batch = 1  # 4 batches of 8 on the 8 test devices
    config.sampler.steps_per_unit_time = 40
    whole = str(tmp_path / "whole")
    uninterrupted = evaluation.run_evaluation(config, whole, model, PooledPixels())

    edits = {"left": 2}
    run = engine.Editor.run

    def stopped_after_two_batches(self, *args):
        if edits["left"] == 0:
            raise KeyboardInterrupt  # e.g. the job's time ran out during the third batch
        edits["left"] -= 1
        return run(self, *args)

    monkeypatch.setattr(engine.Editor, "run", stopped_after_two_batches)
    workdir = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        evaluation.run_evaluation(config, workdir, model, PooledPixels())
    outputs = os.path.join(workdir, "outputs")
    assert sorted(name.split(".", 1)[1] for name in os.listdir(outputs)) == [
        "from0000000.npz",
        "from0000008.npz",
    ]
    edits["left"] = 100
    resumed = evaluation.run_evaluation(config, workdir, model, PooledPixels())
    assert edits["left"] == 98  # only the two unfinished batches were edited
    timing = ("seconds", "images_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(resumed["rows"]) == strip(uninterrupted["rows"])
    assert len([n for n in os.listdir(outputs) if n.endswith(".npz")]) == 1  # merged
