"""Per-row SDXL micro-conditioning columns (``original_size`` ... ``negative_aesthetic_score``).

Manifests name them as ``"H,W"`` (CSV) or ``[H, W]`` (JSONL); bad values and columns the
model does not read fail their row by name; rows whose values are the job's digest as
before. On a tiny random SDXL base, a row's own ``original_size`` changes that row alone:
its batch-mates are bit-identical to a run without the column, and a row naming the
default value gets exactly the default output.
"""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from sdedit_jax.data import guide_inputs
from sdedit_jax.data.guide_inputs import micro
from sdedit_jax.jobs import manifest, text
from sdedit_jax.latent import sdxl

SIDE = 32
BASE_FIELDS = ("original_size", "crops_coords_top_left", "target_size")
JOB_VALUES = {
    "original_size": (32.0, 32.0),
    "crops_coords_top_left": (0.0, 0.0),
    "target_size": (32.0, 32.0),
    "aesthetic_score": 6.0,
    "negative_aesthetic_score": 2.5,
}


def _catalog(tmp_path, text, name, fields=BASE_FIELDS):
    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(tmp_path / "g.png")
    (tmp_path / name).write_text(text, encoding="utf-8")
    inputs = guide_inputs.GuideInputConfig(
        source="manifest",
        path=str(tmp_path / name),
        image_size=(SIDE, SIDE),
        micro=None if fields is None else micro.MicroInputs(JOB_VALUES, fields),
    )
    catalog = guide_inputs.build_catalog(inputs)
    return {i: k for k, i in enumerate(catalog.ids)}, catalog.columns


def test_csv_and_jsonl_columns_fill_the_jobs_values_and_name_bad_ones(tmp_path):
    csv = (
        "id,path,original_size,crops_coords_top_left\n"
        'a,g.png,,\nb,g.png,"64,48",\nc,g.png,"32,32","4,2"\nd,g.png,"x,8",\n'
    )
    rows, columns = _catalog(tmp_path, csv, "m.csv")
    assert columns["original_size"].tolist() == [[32, 32], [64, 48], [32, 32], [32, 32]]
    assert columns["crops_coords_top_left"][rows["c"]].tolist() == [4, 2]
    assert columns["target_size"].tolist() == [[32, 32]] * 4  # the guides' size
    assert columns[micro.OWN].tolist() == [False, True, True, False]
    assert [bool(e) for e in columns["error"]] == [False, False, False, True]
    assert columns["error"][rows["d"]] == (
        f"manifest ({tmp_path / 'm.csv'}) line 5: original_size: expected two numbers >= 0 "
        "as \"H,W\" or [H, W], got 'x,8'"
    )
    lines = [
        {"id": "e", "path": "g.png", "target_size": [16, 8]},
        {"id": "f", "path": "g.png", "original_size": [-1, 2]},
        {"id": "g", "path": "g.png", "aesthetic_score": 7},  # the base reads none
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    rows, columns = _catalog(tmp_path, text, "m.jsonl")
    assert columns["target_size"][rows["e"]].tolist() == [16, 8]
    assert "line 2: original_size: expected" in columns["error"][rows["f"]]
    assert "[-1, 2]" in columns["error"][rows["f"]]
    assert columns["error"][rows["g"]].startswith("aesthetic_score (")
    assert "got 7.0, but the SDXL model reads only original_size" in columns["error"][rows["g"]]
    assert "aesthetic_score" not in columns  # not a column of the base


def test_other_models_refuse_the_columns_by_name(tmp_path):
    text = json.dumps({"id": "a", "path": "g.png", "original_size": "64,48"}) + "\n"
    _, columns = _catalog(tmp_path, text, "m.jsonl", fields=None)
    assert columns["error"][0].startswith("original_size (")
    assert "got [64.0, 48.0], but the model is not an SDXL model" in columns["error"][0]
    assert not set(micro.FIELDS) & set(columns)


def test_rows_with_the_jobs_values_digest_as_before_and_others_do_not(tmp_path):
    lines = [
        {"id": "a", "path": "g.png"},
        {"id": "b", "path": "g.png", "original_size": [32, 32]},  # the job's value
        {"id": "c", "path": "g.png", "original_size": [64, 48]},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    _, columns = _catalog(tmp_path, text, "m.jsonl")
    earlier = {k: v for k, v in columns.items() if k not in (*micro.FIELDS, micro.OWN)}
    now, before = manifest.digests(columns), manifest.digests(earlier)
    assert now[:2].tolist() == before[:2].tolist()
    assert now[2] != before[2]


@pytest.mark.parametrize("refiner", [False, True])
def test_each_rows_time_ids_are_its_own_columns(refiner):
    model = types.SimpleNamespace(requires_aesthetics_score=refiner)
    model.time_ids = types.MethodType(sdxl.SDXLModel.time_ids, model)
    batch = {
        "original_size": np.array([[32, 32], [64, 48]], np.float32),
        "crops_coords_top_left": np.array([[0, 0], [4, 2]], np.float32),
    }
    if refiner:
        batch |= {"aesthetic_score": np.array([6.0, 7.5], np.float32)}
        batch |= {"negative_aesthetic_score": np.array([2.5, 1.0], np.float32)}
        expected = [[32, 32, 0, 0, 6.0], [64, 48, 4, 2, 7.5]]
        negative = [[32, 32, 0, 0, 2.5], [64, 48, 4, 2, 1.0]]
    else:
        batch |= {"target_size": np.array([[32, 32], [16, 8]], np.float32)}
        expected = negative = [[32, 32, 0, 0, 32, 32], [64, 48, 4, 2, 16, 8]]
    conditioner = text.XLConditioner(model, with_negative=True)
    assert conditioner.time_ids(batch, "aesthetic_score").tolist() == expected
    assert conditioner.time_ids(batch, "negative_aesthetic_score").tolist() == negative


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    for package in ("torch", "diffusers", "transformers"):
        pytest.importorskip(package, reason="the tiny SDXL folder is saved by diffusers")
    from sdedit_jax import convert
    from tests import job_cli, sd_reference

    root = tmp_path_factory.mktemp("sdxl_rows")
    sd_reference.save_xl_pipeline(str(root / "pipe"))
    convert.convert(str(root / "pipe"), str(root / "converted"))
    job_cli.photo_guides(root / "guides", SIDE, ("paint_chelsea.png", "paint_rocket.png"))
    return str(root / "converted"), root


def _job(model_dir, manifest_path, workdir):
    from sdedit_jax.jobs.run import run_job
    from sdedit_jax.util.config import load_config

    config = load_config("configs/sdxl.py:base")
    config.model_dir = model_dir
    config.input.source = "manifest"
    config.input.path = str(manifest_path)
    config.input.image_size = (SIDE, SIDE)
    config.sampler.steps_per_unit_time = 10
    config.per_device_batch = 1
    config.contact_sheet = False
    config.output.png = False
    config.output.npz = "per_example"
    config.prompt = "a photo"
    result = run_job(config, str(workdir))
    sub = os.path.join(str(workdir), "t0_0.60")
    rows = {}
    for line in open(os.path.join(sub, "manifest.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        rows[row["id"]] = (row, np.load(os.path.join(sub, row["npz"]))["image"])
    failures = [json.loads(line) for line in open(os.path.join(sub, "failures.jsonl"))]
    return result, rows, failures


@pytest.mark.slow
def test_a_rows_own_original_size_changes_that_row_alone(base_folder, tmp_path):
    model_dir, root = base_folder
    guides = root / "guides"
    paths = {"a": "paint_chelsea.png", "b": "paint_chelsea.png", "c": "paint_rocket.png"}
    plain = [{"id": i, "path": str(guides / p)} for i, p in paths.items()]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    own = [dict(plain[0]), dict(plain[1], original_size=[64, 48])]
    own += [dict(plain[2], original_size="32,32")]  # the job's value, named
    own += [{"id": "d", "path": str(guides / "paint_rocket.png"), "original_size": "big"}]
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in own))

    from sdedit_jax import engine

    _, before, _ = _job(model_dir, tmp_path / "plain.jsonl", tmp_path / "plain")
    programs = engine.compiled_program_count()
    result, after, failures = _job(model_dir, tmp_path / "own.jsonl", tmp_path / "own")
    assert engine.compiled_program_count() == programs  # values, not a program per value
    assert result["failures"] == 1 and [f["id"] for f in failures] == ["d"]
    assert f"{tmp_path / 'own.jsonl'}) line 4: original_size:" in failures[0]["reason"]
    assert "got 'big'" in failures[0]["reason"]
    for i in ("a", "c"):
        np.testing.assert_array_equal(after[i][1], before[i][1])
        assert after[i][0]["original_size"] == [32.0, 32.0]
    assert np.abs(after["b"][1] - before["b"][1]).max() > 1e-3
    assert after["b"][0]["original_size"] == [64.0, 48.0]
    assert after["b"][0]["target_size"] == [32.0, 32.0]  # the guides' size, not the original
    assert after["b"][0]["inputs"] != before["b"][0]["inputs"]
    assert after["a"][0]["inputs"] == before["a"][0]["inputs"]
    assert after["c"][0]["inputs"] == before["c"][0]["inputs"]
    assert "aesthetic_score" not in after["a"][0]

    own[1]["original_size"] = [64, 64]  # a finished row's input changed: named, not redone
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in own))
    _, again, failures = _job(model_dir, tmp_path / "own.jsonl", tmp_path / "own")
    changed = {f["id"]: f for f in failures if f.get("inputs_changed")}
    assert list(changed) == ["b"] and changed["b"]["inputs_changed"] == "original_size"
    assert "([64.0, 48.0] then, [64.0, 64.0] now)" in changed["b"]["reason"]
    np.testing.assert_array_equal(again["b"][1], after["b"][1])
