"""Guide sources as modules: each source's own options block, the flat keys it replaced
refused by name, and a new source added by one module and one entry of the list."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from sdedit_jax.data import guide_inputs
from sdedit_jax.data.guide_inputs import sources
from sdedit_jax.data.guide_inputs.sources import tfds as tfds_source
from sdedit_jax.jobs import checks as job
from sdedit_jax.util import cli
from sdedit_jax.util import config as config_files
from sdedit_jax.util.config import load_config
from tests import job_cli
from tests.test_guide_inputs import SIZE, collect, expected_guide, expected_mask, random_rgb, save

# The flat keys of config.input before the source blocks (configs/default.py of the
# previous version), each with its new place and a value to set.
OLD_KEYS = {
    "mask_dir": ("folder.mask_dir", ""),
    "tfds_name": ("tfds.name", "my_set"),
    "tfds_split": ("tfds.split", "train"),
    "tfds_data_dir": ("tfds.data_dir", "/data/tfds"),
    "tfds_image_key": ("tfds.image_key", "photo"),
    "tfds_mask_key": ("tfds.mask_key", "alpha"),
}


@pytest.mark.parametrize("old", sorted(OLD_KEYS))
def test_each_old_flat_key_is_refused_naming_its_new_place(old):
    new, value = OLD_KEYS[old]
    # The Python API.
    with pytest.raises(ValueError, match=f"^{old}: moved to {re.escape(new)}$"):
        guide_inputs.GuideInputConfig.from_mapping({"source": "folder", "path": "x", old: value})
    # A config file of the previous version, through the job's check.
    config = load_config("configs/default.py")
    config.input.unlock()
    config.input[old] = value
    with pytest.raises(job.ConfigError) as error:
        job.check_config(config)
    assert str(error.value) == f"config.input.{old}: moved to config.input.{new}"
    # The command line (checked before ml_collections sees it); the new place is known.
    fresh = load_config("configs/default.py")
    moved = guide_inputs.moved_fields("input")
    assert config_files.unknown_path(fresh, f"input.{old}", value, "--config", moved) == (
        f"--config.input.{old}: moved to --config.input.{new}"
    )
    assert config_files.unknown_path(fresh, f"input.{new}", value, "--config", moved) is None


@pytest.mark.slow
def test_an_old_key_on_the_command_line_is_one_line_with_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "sdedit_jax.main", "--config.input.tfds_name=my_set"]
    cmd += ["--workdir", str(tmp_path / "unused")]
    env = job_cli.env(devices=1)
    proc = subprocess.run(
        cmd, cwd=job_cli.REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert job_cli.error_lines(proc.stderr) == [
        "sdedit_jax: configs/default.py: --config.input.tfds_name: moved to "
        "--config.input.tfds.name"
    ]
    assert not os.path.exists(tmp_path / "unused")


def test_source_blocks_are_parsed_checked_and_reach_their_source(tmp_path):
    config = load_config("configs/default.py")
    config.input.source = "tfds"
    config.input.tfds.update(name="my_set", split="train", data_dir="/d", image_key="photo")
    inputs = job.check_config(config).input_config(0.5)
    assert inputs.options["tfds"] == tfds_source.Options(
        name="my_set", split="train", data_dir="/d", image_key="photo", mask_key=""
    )
    assert inputs.options["folder"].mask_dir == "masks"  # every block exists, defaults filled
    config.input.tfds.name = ""
    with pytest.raises(job.ConfigError, match=r"^config.input.tfds.name: required when source"):
        job.check_config(config)
    with pytest.raises(ValueError, match=r"^tfds.split: expected a string, got 3$"):
        guide_inputs.GuideInputConfig.from_mapping({"source": "tfds", "tfds": {"split": 3}})
    with pytest.raises(ValueError, match=r"^tfds.nme: unknown field.*; did you mean tfds.name\?$"):
        guide_inputs.GuideInputConfig.from_mapping({"source": "tfds", "tfds": {"nme": "x"}})
    with pytest.raises(ValueError, match=r"^tfrecord: unknown field"):  # it has no options
        guide_inputs.GuideInputConfig.from_mapping(
            {"source": "tfrecord", "path": "x", "tfrecord": {}}
        )

    # folder.mask_dir reaches the folder source: masks pair only from the named folder.
    root = str(tmp_path / "guides")
    guide, mask = save(root, "a.png", random_rgb()), save(root, "alpha/a.png", random_rgb()[..., 0])
    base = {"source": "folder", "path": root, "image_size": SIZE}
    assert sorted(collect(base)[0]) == ["a.png", "alpha/a.png"]  # alpha/ is no mask folder
    rows, _, _ = collect({**base, "folder": {"mask_dir": "alpha"}})
    assert sorted(rows) == ["a.png"] and rows["a.png"]["ok"]
    np.testing.assert_array_equal(rows["a.png"]["guide"], expected_guide(guide))
    np.testing.assert_array_equal(rows["a.png"]["mask"], expected_mask(mask))


# A source written outside the package: the folder's files whose names match a pattern.
GLOB_SOURCE = """
import dataclasses
import fnmatch
import os

from sdedit_jax.data.guide_inputs.catalog import Source, _catalog, _Row

NAME = "glob"


@dataclasses.dataclass(frozen=True)
class Options:
    '''``config.input.glob``.

    Attributes:
        pattern: the guide file names to take (fnmatch).
    '''

    pattern: str = "*"

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"pattern: expected a string, got {self.pattern!r}")


def _list(config):
    pattern = config.options[NAME].pattern
    names = sorted(n for n in os.listdir(config.path) if fnmatch.fnmatch(n, pattern))
    rows = []
    for name in names:
        path = os.path.join(config.path, name)
        rows.append(_Row(id=name, source=path, t0=config.t0, seed=config.seed, guide_path=path))
    return _catalog(rows)


SOURCE = Source(
    NAME, _list, Options, required=("path", "glob.pattern"), moved={"glob_pattern": "pattern"}
)
"""


def test_a_source_is_one_module_and_one_entry_in_the_list(tmp_path, monkeypatch):
    path = tmp_path / "glob_source.py"
    path.write_text(GLOB_SOURCE)
    spec = importlib.util.spec_from_file_location("glob_source", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sources, "MODULES", (*sources.MODULES, module))  # the one entry

    root = str(tmp_path / "guides")
    guides = {n: save(root, n, random_rgb()) for n in ("a.png", "b.png", "c.jpg")}
    config = {"source": "glob", "path": root, "image_size": SIZE, "glob": {"pattern": "*.png"}}
    assert guide_inputs.GuideInputConfig.from_mapping(config).options["glob"].pattern == "*.png"
    rows, _, _ = collect(config)
    assert sorted(rows) == ["a.png", "b.png"]
    for name in rows:
        assert rows[name]["ok"], rows[name]["error"]
        np.testing.assert_array_equal(rows[name]["guide"], expected_guide(guides[name]))
    # Its checks and its old flat key behave like those of the built-in sources.
    with pytest.raises(ValueError, match=r"^glob.pattern: required when source is 'glob'$"):
        guide_inputs.GuideInputConfig.from_mapping({**config, "glob": {"pattern": ""}})
    with pytest.raises(ValueError, match=r"^glob_pattern: moved to glob.pattern$"):
        guide_inputs.GuideInputConfig.from_mapping({**config, "glob_pattern": "*"})
    assert guide_inputs.moved_fields("input")["input.glob_pattern"] == "input.glob.pattern"
    # The default config gets its block, and --help its line, from the same entry.
    config, docs = cli.load(os.path.join(job_cli.REPO, "configs", "default.py"))
    assert config.input.glob.pattern == "*"
    assert docs["input.glob.pattern"] == "the guide file names to take (fnmatch) (source=glob)"
