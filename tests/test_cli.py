"""The commands' front end: help, --print_config, one-line errors (exit 2), dry-run output."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdedit_jax.data import compositing
from sdedit_jax.data import image_grid as report
from sdedit_jax.jobs import checks
from sdedit_jax.jobs import run as job
from sdedit_jax.util import cli
from sdedit_jax.util import config as config_files
from sdedit_jax.util.config import load_config
from tests import job_cli

REPO = job_cli.REPO


def _main(*args: str, cwd: str = REPO, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    """``python -m sdedit_jax.main`` (a hang fails the test)."""
    return subprocess.run(
        [sys.executable, "-m", "sdedit_jax.main", *args],
        cwd=cwd,
        env={**job_cli.env(devices=1), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_field_of_the_default_config_has_one_meaning():
    """``--help`` prints FIELD_DOCS beside each default: no field without one, no stale entry."""
    config, docs = cli.load("configs/default.py")
    assert sorted(name for name, _ in cli.fields(config)) == sorted(docs)
    assert all(docs.values()) and all("\n" not in text for text in docs.values())


@pytest.mark.slow
def test_help_exits_0_with_own_flags_and_every_config_field_only():
    proc = _main("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert job_cli.error_lines(proc.stderr) == []
    config, docs = cli.load("configs/default.py")
    out = proc.stdout
    for name, _ in cli.fields(config):
        assert f"  --config.{name}=" in out, name
    assert "  --config.t0s=(0.3, 0.5, 0.7)  " + docs["t0s"] in out
    assert "  --config.sampler.predictor=sde_dpm_solver_2m  " + docs["sampler.predictor"] in out
    for flag in ("--config", "--workdir", "--dry_run", "--print_config", "--retry_failed"):
        assert f"  {flag}: " in out
    # Nothing of TensorFlow, XLA, orbax or absl's own flags (absl's help lists 176 lines).
    flag_lines = [line for line in out.splitlines() if line.startswith("  --")]
    for foreign in ("--xla", "--jax_", "--tf_", "--alsologtostderr", "--only_check_args"):
        assert foreign not in out
    assert len(flag_lines) == 9 + len(docs)


@pytest.mark.slow
def test_print_config_shows_overrides_and_a_misspelt_field_is_one_line():
    proc = _main("--print_config", "--config.seed=3", "--config.sampler.snr=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout)
    assert (printed["seed"], printed["sampler"]["snr"], printed["t0s"]) == (3, 0.5, [0.3, 0.5, 0.7])

    proc = _main("--config.sampler.predicto=ddim", "--workdir", "unused")
    assert proc.returncode == 2
    (line,) = job_cli.error_lines(proc.stderr)
    assert line.startswith("sdedit_jax: configs/default.py: --config.sampler.predicto: ")
    assert line.endswith("did you mean --config.sampler.predictor?")
    assert "'ddim'" in line and "known: corrector, corrector_steps" in line
    assert not os.path.exists(os.path.join(REPO, "unused"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (("--config.bogus=1",), "configs/default.py: --config.bogus: unknown field, got '1'"),
        (("--workdir=", "--config.seed=abc"), "--config.seed=abc: invalid literal for int()"),
        (("--workdir=", "--config=configs/paper.py:nope"), "variant 'nope' unknown"),
    ],
)
def test_command_line_errors_are_one_line_with_exit_2(args, expected):
    proc = _main(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = job_cli.error_lines(proc.stderr)
    assert expected in line and "Traceback" not in proc.stderr


def test_api_refuses_unknown_fields_with_the_command_line_text():
    config = load_config("configs/default.py")
    config.sampler.unlock()
    config.sampler.predicto = "ddim"
    with pytest.raises(ValueError) as error:
        checks.check_config(config)
    text = str(error.value)
    assert text.startswith("config.sampler.predicto: unknown field, got 'ddim' (known: corrector")
    assert text.endswith("; did you mean config.sampler.predictor?")
    fresh = load_config("configs/default.py")
    assert config_files.unknown_path(fresh, "sampler.predicto", "ddim") == text


def test_unknown_path_names_blocks_and_values():
    config = load_config("configs/default.py")
    assert config_files.unknown_path(config, "sampler.snr", "1") is None
    assert config_files.unknown_path(config, "input.generator_kwargs", "{}") is None
    assert config_files.unknown_path(config, "sampler.snr.x", "1") == (
        "config.sampler.snr.x: unknown field, got '1' (config.sampler.snr is a value, not a block)"
    )
    assert "did you mean" not in config_files.unknown_path(config, "zzz", 1)


def test_dry_run_escapes_control_characters_and_counts_network_calls(tmp_path, capsys):
    """Default sampler: ceil(100 t0) steps of 1 call each (SDE-DPM-Solver++(2M)), K = 1."""
    guides = tmp_path / "guides"
    name = "red\x1b[2Jeye\n.png"
    job_cli.save_png(str(guides / name), np.zeros((32, 32, 3), np.uint8))
    config = load_config("configs/default.py")
    config.input.update(path=str(guides))
    config.input.folder.mask_dir = ""
    result = job.run_job(config, str(tmp_path / "work"), dry_run=True)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "red\\x1b[2Jeye\\n.png" in out
    expected = [math.ceil(100 * t0 - 1e-9) for t0 in (0.3, 0.5, 0.7)]
    assert expected == [30, 50, 70]
    assert [part["network_calls"] for part in result["plan"]] == expected
    assert result["network_calls"] == sum(expected)
    assert "(t0=0.5, 50 network calls)" in out and "in all: 3 edits, 150 network calls" in out
    assert not (tmp_path / "work").exists()


def test_workdir_must_name_a_folder_in_the_api(tmp_path):
    with pytest.raises(ValueError, match=r"^workdir: got ''; expected a folder"):
        job.run_job(load_config("configs/default.py"), "")


def test_long_contact_sheet_labels_wrap_instead_of_being_cut():
    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    label = "strokes_u1f345_with_a_long_name_0123456789.png"
    lines = report._wrap(draw, label, 102, 8)
    assert "".join(lines) == label and len(lines) > 1
    assert all(draw.textlength(line) <= 102 for line in lines)
    long = report._wrap(draw, label * 10, 102, 4)
    assert len(long) == 4 and long[0] == lines[0] and long[-1].endswith(".png")
    assert long[2].startswith("...")


def test_composite_refuses_huge_scale_dilation_and_headers_quickly(tmp_path):
    source = np.zeros((8, 8, 3), np.uint8)
    region = np.ones((8, 8), bool)
    target = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(compositing.CompositeError, match=r"^--at: the 8000000x8000000 region"):
        compositing.paste(source, region, target, (0, 0), scale=1e6)
    _, mask = compositing.paste(source, region, target, (0, 0), dilate=10**9)
    assert mask.all()  # every pixel lies within the radius; image-size work, not radius-size
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # 400M pixels, a small file
    with pytest.raises(compositing.CompositeError, match=r"header declares over 67108864 pixels"):
        compositing.read_rgb(str(huge), "--target")
    (tmp_path / "file").write_text("x")
    with pytest.raises(compositing.CompositeError, match=r"^--out: .*file is a file"):
        compositing.write_guide(str(tmp_path / "file"), "g", target, mask)


def test_dilation_by_distance_transform_equals_the_disk_structure():
    from scipy import ndimage

    mask = np.random.default_rng(0).random((40, 50)) > 0.97
    for radius in (1, 2, 5, 9):
        offsets = np.arange(-radius, radius + 1)
        disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
        expected = ndimage.binary_dilation(mask, structure=disk)
        np.testing.assert_array_equal(compositing.disk_dilate(mask, radius), expected)


@pytest.mark.slow
def test_evaluate_builds_its_emoji_into_the_cache_and_an_empty_reference_is_one_line(tmp_path):
    cache, empty, cwd = tmp_path / "cache", tmp_path / "empty", tmp_path / "cwd"
    empty.mkdir()
    cwd.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdedit_jax.evaluate",
            "--config",
            "configs/eval_tiny.py",
            f"--config.reference.paths=('{empty}',)",
            f"--workdir={tmp_path / 'work'}",
        ],
        cwd=cwd,
        env={**job_cli.env(devices=1), "PYTHONPATH": REPO, "XDG_CACHE_HOME": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = job_cli.error_lines(proc.stderr)
    assert line.startswith(f"evaluate: config.reference.paths ('{empty}'): ")
    assert "holds no files" in line
    built = json.loads((cache / "sdedit_jax" / "emoji32" / "manifest.json").read_text())
    assert built["counts"]["test"] > 8 and f"building {cache}" in proc.stdout
    assert os.listdir(cwd) == []  # nothing in the current folder


@pytest.mark.slow
def test_help_of_the_other_commands_exits_0_with_their_own_flags():
    for module, flag in (
        ("sdedit_jax.evaluate", "--workdir: output folder"),
        ("sdedit_jax.composite", "--dilate: grow the written mask"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO,
            env=job_cli.env(devices=1),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and flag in proc.stdout, (module, proc.stderr[-1000:])
        assert "--xla" not in proc.stdout and job_cli.error_lines(proc.stderr) == []


@pytest.mark.slow
def test_a_clone_folder_named_like_the_package_is_named_in_one_line(tmp_path):
    """Run from the parent of a clone ``sdedit_jax/`` (no ``__init__.py``): the package
    imports as that namespace folder while its modules come from the installed tree (as
    with setuptools' editable finder, which comes after the current folder)."""
    (tmp_path / "sdedit_jax").mkdir()
    (tmp_path / "sdedit_jax" / "README.md").write_text("a clone\n")
    bootstrap = (
        "import runpy, sys; import sdedit_jax; "
        f"sdedit_jax.__path__.append({os.path.join(REPO, 'sdedit_jax')!r}); "
        "sys.argv = ['main', '--workdir', 'w']; "
        "runpy.run_module('sdedit_jax.main', run_name='__main__', alter_sys=True)"
    )
    env = {k: v for k, v in job_cli.env(devices=1).items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", bootstrap],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = job_cli.error_lines(proc.stderr)
    assert line.startswith(f"sdedit_jax: the folder {tmp_path / 'sdedit_jax'} (not the package")
