"""SDXL's base-then-refiner recipe in one command (``configs/sdxl.py:base_refiner``).

On tiny random SDXL base and refiner folders: the refiner stage reads the base's float
arrays exactly (not their PNGs), equals the refiner job run by hand on those arrays,
keeps each row's prompt and its original guide outside the mask, and a run interrupted
in its refiner stage resumes to the uninterrupted run's outputs, skipping finished rows
of both stages. ``.npz`` guides are read bit for bit.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sdedit_jax.data import guide_inputs

SIDE = 32
GUIDES = ("edit_astronaut.png", "edit_coffee.png", "paint_chelsea.png")
# Three rows per guide: more than the 8 rows of one batch on the 8 test devices.
NAMES = tuple(f"{k}_{g}" for k in range(3) for g in GUIDES)
PROMPTS = {n: "an astronaut" for n in NAMES if "astronaut" in n} | {NAMES[1]: "a cup"}


def _guide(name):
    return name.split("_", 1)[1]


def test_npz_guides_are_read_exactly(tmp_path):
    values = np.random.default_rng(0).uniform(-1, 1, (8, 8, 3)).astype(np.float32)
    overshoot = values.copy()
    overshoot[0, 0] = (1.5, -2.0, 0.25)  # a decoder's overshoot: clipped, as PNGs are
    np.savez(tmp_path / "a.npz", image=overshoot)
    np.savez(tmp_path / "b.npz", other=values)
    inputs = guide_inputs.GuideInputConfig(source="folder", path=str(tmp_path), image_size=8)
    catalog = guide_inputs.build_catalog(inputs)
    assert catalog.ids == ["a.npz", "b.npz"]
    found = guide_inputs.preview_examples(inputs, catalog, ["a.npz", "b.npz"])
    assert list(found) == ["a.npz"]
    np.testing.assert_array_equal(found["a.npz"][0][1:], values[1:])
    np.testing.assert_array_equal(found["a.npz"][0][0, 0], (1.0, -1.0, 0.25))
    assert not np.array_equal(np.round((values + 1) * 127.5) / 127.5 - 1, values)
    stream = guide_inputs.make_guide_dataset(
        inputs, batch_size_per_host=2, process_index=0, process_count=1, catalog=catalog
    )
    errors = next(stream.dataset.as_numpy_iterator())["error"]
    assert errors[0] == b""
    assert errors[1].decode().endswith("npz holds ['other']; expected the key 'image'")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    for package in ("torch", "diffusers", "transformers"):
        pytest.importorskip(package, reason="the tiny SDXL folders are saved by diffusers")
    from sdedit_jax import convert
    from tests import job_cli, sd_reference

    root = tmp_path_factory.mktemp("sdxl_two_stage")
    for stage in ("base", "refiner"):
        sd_reference.save_xl_pipeline(str(root / stage), refiner=stage == "refiner")
        convert.convert(str(root / stage), str(root / f"{stage}_model"))
    guides = root / "guides"
    job_cli.photo_guides(guides, SIDE, GUIDES)
    rows = [
        {"id": n, "path": str(guides / _guide(n)), "mask": str(guides / "masks" / _guide(n)), **(
            {"prompt": PROMPTS[n]} if n in PROMPTS else {})}
        for n in NAMES
    ]  # fmt: skip
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(root, variant="base_refiner"):
    from sdedit_jax.util.config import load_config

    config = load_config(f"configs/sdxl.py:{variant}")
    config.model_dir = str(root / ("refiner_model" if variant == "refiner" else "base_model"))
    config.input.source = "manifest"
    config.input.path = str(root / "rows.jsonl")
    config.input.image_size = (SIDE, SIDE)
    config.input.resize = False
    config.sampler.steps_per_unit_time = 10
    config.per_device_batch = 1
    config.contact_sheet = False
    config.output.npz = "per_example"
    config.prompt = "a photo"
    if variant == "base_refiner":
        config.refiner.model_dir = str(root / "refiner_model")
    return config


def _arrays(sub):
    rows = [json.loads(line) for line in open(os.path.join(sub, "manifest.jsonl"))]
    return {r["id"]: (r, np.load(os.path.join(sub, r["npz"]))["image"]) for r in rows}


@pytest.fixture(scope="module")
def two_stage_run(models):
    from sdedit_jax.jobs import two_stage

    workdir = str(models / "run")
    result = two_stage.run_two_stage(_config(models), workdir)
    return workdir, result


@pytest.mark.slow
def test_the_refiner_stage_is_the_refiner_job_on_the_bases_floats(models, two_stage_run):
    from sdedit_jax.jobs.run import run_job

    workdir, result = two_stage_run
    assert result["failures"] == 0 and result["refiner"]["edited"] == len(NAMES)
    base = _arrays(os.path.join(workdir, "base", "t0_0.60"))
    refined = _arrays(os.path.join(workdir, "refiner", "t0_0.30"))
    # By hand: a manifest of the base's npz files with the rows' masks and prompts.
    by_hand = [
        {"id": n, "path": os.path.join(workdir, "base", "t0_0.60", base[n][0]["npz"]),
         "mask": str(models / "guides" / "masks" / _guide(n)),
         "prompt": PROMPTS.get(n, "a photo")}
        for n in NAMES
    ]  # fmt: skip
    (models / "by_hand.jsonl").write_text("".join(json.dumps(r) + "\n" for r in by_hand))
    config = _config(models, "refiner")
    config.input.path = str(models / "by_hand.jsonl")
    run_job(config, str(models / "by_hand"))
    expected = _arrays(str(models / "by_hand" / "t0_0.30"))
    refiner_reads = ("original_size", "crops_coords_top_left")
    refiner_reads += ("aesthetic_score", "negative_aesthetic_score")
    inputs = guide_inputs.GuideInputConfig(  # as the refiner stage lists its guides
        source="manifest",
        path=os.path.join(workdir, "refiner_guides.jsonl"),
        image_size=SIDE,
        text=guide_inputs.TextInputs(),
        micro=guide_inputs.micro.MicroInputs(
            {"original_size": (32.0, 32.0), "crops_coords_top_left": (0.0, 0.0),
             "target_size": (32.0, 32.0), "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5},
            refiner_reads,
        ),
    )  # fmt: skip
    seen = guide_inputs.preview_examples(inputs, guide_inputs.build_catalog(inputs), NAMES)
    for n in NAMES:
        np.testing.assert_allclose(refined[n][1], expected[n][1], atol=1e-6, rtol=0)
        # The floats exactly (clipped to [-1, 1], as their PNG is), not the PNG's 8 bits.
        np.testing.assert_array_equal(seen[n][0], np.clip(base[n][1], -1, 1))
        assert not np.array_equal(np.round((base[n][1] + 1) * 127.5) / 127.5 - 1, base[n][1])
        assert refined[n][0]["prompt"] == PROMPTS.get(n, "a photo")
        assert refined[n][0]["aesthetic_score"] == 6.0
        guide = np.asarray(Image.open(models / "guides" / _guide(n)), np.float32) / 127.5 - 1
        keep = np.asarray(Image.open(models / "guides" / "masks" / _guide(n))) == 0
        assert keep.any() == _guide(n).startswith("edit_")  # paintings are edited whole
        np.testing.assert_array_equal(refined[n][1][keep], guide[keep])
        assert np.abs(refined[n][1] - base[n][1]).max() > 1e-3  # the refiner did edit


@pytest.mark.slow
def test_an_interrupted_two_stage_run_resumes_to_the_same_outputs(
    models, two_stage_run, monkeypatch
):
    from sdedit_jax.jobs import sinks, two_stage

    reference, _ = two_stage_run
    workdir = str(models / "interrupted")
    config = _config(models)
    original = sinks.Sink.write_batch

    def write_then_stop(self, batch, *args, **kwargs):  # the refiner's first batch, then a kill
        original(self, batch, *args, **kwargs)
        if "refiner" in self.workdir:
            raise KeyboardInterrupt

    monkeypatch.setattr(sinks.Sink, "write_batch", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        two_stage.run_two_stage(config, workdir)
    monkeypatch.setattr(sinks.Sink, "write_batch", original)
    result = two_stage.run_two_stage(config, workdir)
    base_run = result["base"]["this_run"]["sub_jobs"][0]
    refiner_run = result["refiner"]["this_run"]["sub_jobs"][0]
    assert (base_run["edited"], base_run["skipped_done"]) == (0, len(NAMES))
    assert refiner_run["skipped_done"] >= 1 and refiner_run["edited"] < len(NAMES)
    for stage, sub in (("base", "t0_0.60"), ("refiner", "t0_0.30")):
        found = _arrays(os.path.join(workdir, stage, sub))
        expected = _arrays(os.path.join(reference, stage, sub))
        assert sorted(found) == sorted(expected)
        for n in found:
            np.testing.assert_array_equal(found[n][1], expected[n][1])
